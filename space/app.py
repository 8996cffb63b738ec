"""Delta-Adapter as a Hugging Face Space: the app of `diffusers-delta app`, on the embedded toy model by default (CPU
basic hardware is enough), or on FLUX.2 [klein] with an adapter when the Space's variables name them:

    BASE_MODEL=black-forest-labs/FLUX.2-klein-4B   DELTA_ADAPTER=org/delta-adapter   (a GPU of 24 GB: L4 or A10G)
"""

import os

import torch

from diffusers_delta.app import build_app, describe_model
from diffusers_delta.cli import UsageError, load_edit_pipeline


class SpaceSetupError(RuntimeError):
    """The Space's variables name no model it can serve; the message names the variables and what to set."""


def load_space_pipeline(base: str | None, adapter: str | None, device: str | None = None):
    """The pipeline a Space's variables name (`BASE_MODEL`, `DELTA_ADAPTER`; neither: the embedded toy model), with
    every failure told in the Space's own terms.

    Args:
        base: `BASE_MODEL`, a FLUX.2 [klein] or FLUX.1 Kontext Hub id (or None).
        adapter: `DELTA_ADAPTER`, the Delta-Adapter's Hub id (or None).
        device: where to run it.

    Raises:
        SpaceSetupError: one variable set without the other it needs, or a model that does not load.
    """
    if base and not adapter:
        raise SpaceSetupError(
            f"The Space's variable BASE_MODEL is set ({base}) but DELTA_ADAPTER is not: set DELTA_ADAPTER to the "
            "Delta-Adapter trained for that base (Settings > Variables and secrets), or remove BASE_MODEL to serve "
            "the embedded toy model."
        )
    try:
        return load_edit_pipeline(base, adapter, device)
    except (UsageError, ValueError, OSError) as error:
        if adapter and not base:
            raise SpaceSetupError(
                f"The Space's variable DELTA_ADAPTER ({adapter}) does not load on the embedded toy model, which "
                f"serves when BASE_MODEL is not set: set BASE_MODEL to the base it was trained for (such as "
                f"black-forest-labs/FLUX.2-klein-4B). ({error})"
            ) from None
        raise SpaceSetupError(
            f"The Space's BASE_MODEL ({base}) with DELTA_ADAPTER ({adapter}) does not load: {error}"
        ) from None


BASE_MODEL, DELTA_ADAPTER = os.environ.get("BASE_MODEL") or None, os.environ.get("DELTA_ADAPTER") or None

pipe = load_space_pipeline(BASE_MODEL, DELTA_ADAPTER, device="cuda" if torch.cuda.is_available() else None)
demo = build_app(pipe, toy_examples=BASE_MODEL is None, about=describe_model(BASE_MODEL, DELTA_ADAPTER))

if __name__ == "__main__":
    demo.queue().launch()
