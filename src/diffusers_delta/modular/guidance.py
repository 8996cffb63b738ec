"""Classifier-free guidance from "no edit" towards the exemplar's edit, for text-free FLUX.3 pipelines."""

from __future__ import annotations

import torch
from diffusers.guiders import ClassifierFreeGuidance


class NoEditGuidance(ClassifierFreeGuidance):
    """Upstream's classifier-free guidance whose unconditional pass runs without the Delta-Adapter's edit (the prompt
    is the same empty one in both), so `guidance_scale` amplifies the exemplar's edit itself, as the classic
    pipelines' `guidance_scale` does on non-distilled transformers. A text-free `Flux3DeltaModularPipeline` holds one,
    disabled (`pipe.guider.enable()`, or `pipe.update_components(guider=NoEditGuidance(guidance_scale=4.0))`).

    The edit is switched off through the transformer's `DeltaCall` (FLUX.3's processors read the edit there), for the
    pass the guider prepares the transformer for; a transformer without the Delta-Adapter is left as it is.
    """

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Upstream's preparation of a pass, and the edit switched off for the unconditional one.

        Args:
            denoiser: the transformer the pass runs.
        """
        super().prepare_models(denoiser)
        call = getattr(denoiser, "_delta_call", None)
        if call is not None:
            call.edit_off = not self.is_conditional

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """The edit back on after a pass, then upstream's clean-up.

        Args:
            denoiser: the transformer the pass ran.
        """
        call = getattr(denoiser, "_delta_call", None)
        if call is not None:
            call.edit_off = False
        super().cleanup_models(denoiser)
