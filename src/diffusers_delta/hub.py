"""Model cards and Hub uploads for Delta-Adapter folders.

Cards are rendered from `hub_cards/delta_adapter_card.md` (installed as `diffusers_delta.hub_cards`) with
huggingface_hub's `ModelCard` / `ModelCardData`: `base_model` with `base_model_relation: adapter`, the base's licence,
`pipeline_tag: image-to-image`, tags, datasets, a gallery of validation results, and a complete usage snippet.
"""

from __future__ import annotations

import os
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .backbones import BACKBONES
from .models.delta_adapter import DeltaAdapterModel


CARD_TEMPLATE = "delta_adapter_card.md"
#: The card's `library_name`. Not "diffusers": the Hub would then offer `DiffusionPipeline.from_pretrained(<adapter>)`
#: under "Use this model", which cannot load an adapter-only repo. A library the Hub does not know gets no generated
#: snippet, so the card's own (complete) snippet is the one users see.
LIBRARY_NAME = "diffusers-delta"
#: Every card's tags; the backbone's name (`flux2`, `flux1`) follows them.
DEFAULT_TAGS = ["diffusers", "diffusers-delta", "delta-adapter", "image-editing", "exemplar-based-editing"]
#: Files a rendered card's usage snippet downloads when the folder holds the validation exemplar.
EXAMPLE_FILES = ("examples/source.png", "examples/target.png", "examples/query.png")
#: The licences of the bases an adapter inherits (its weights are trained on their outputs): klein-4B is Apache-2.0,
#: klein-9B carries the FLUX non-commercial licence, Kontext [dev] the FLUX.1 [dev] non-commercial licence.
BASE_MODEL_LICENSES = {
    "black-forest-labs/FLUX.2-klein-4B": {"license": "apache-2.0"},
    "black-forest-labs/FLUX.2-klein-9B": {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md",
    },
    "black-forest-labs/FLUX.1-Kontext-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
    },
}


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` names a Hub repo (`org/name`) rather than a folder on this machine."""
    if os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def license_metadata(base_model: str | None, license: str | None) -> dict:
    """The card's licence fields, as the Hub accepts them: the one given; else the base model's when it is a known
    one; else, for another base on the Hub, `other` with a name and a link to that base; else none (an unknown local
    base: the card's text says the base's licence applies)."""
    if license is not None:
        return {"license": license}
    if base_model in BASE_MODEL_LICENSES:
        return dict(BASE_MODEL_LICENSES[base_model])
    if base_model and is_hub_repo_id(base_model):
        return {"license": "other", "license_name": "base-model-license",
                "license_link": f"https://huggingface.co/{base_model}"}  # fmt: skip
    return {}


#: What a card calls a toy-world base editor (a FLUX.2 [klein]-architecture model of 64x64 synthetic scenes).
TOY_BASE_NAME = "the toy world's base editor"


def render_model_card(
    adapter: DeltaAdapterModel,
    repo_id: str,
    base_model: str | None,
    image_encoder: str,
    license: str | None = None,
    datasets: list[str] | None = None,
    training: dict | None = None,
    adaptation: dict | None = None,
    validation_grid: str | None = None,
    example_files: bool = False,
    tags: list[str] | None = None,
    toyworld_edit: str | None = None,
    toy_base: bool = False,
) -> ModelCard:
    """The model card of a Delta-Adapter. Names of folders on the training machine never enter it: a local base,
    adapter or image encoder is named by its folder's name only, and the snippet then has a line that says what
    path to put there (a Hub base or adapter is loaded as it is, and the snippet runs as written).

    Args:
        adapter: the adapter (its config and size go into the card).
        repo_id: the Hub repo the card's usage snippet loads (`"org/name"`), or the adapter's folder.
        base_model: the checkpoint it was trained for (Hub id or folder; a FLUX.2 [klein] or FLUX.1 Kontext one, as
            its config's `backbone` says), or None when unknown (the snippet then has a placeholder line that says
            what to put there).
        image_encoder: the SigLIP checkpoint it reads exemplars with (Hub id or folder).
        license: the adapter's licence; by default the base model's (see `BASE_MODEL_LICENSES`).
        datasets: Hub datasets it was trained on.
        training: training settings to list (name -> value).
        adaptation: for a test-time-adapted adapter: `base_adapter`, `num_steps`, `learning_rate`, `lambda_delta`,
            `trainable`.
        validation_grid: path, inside the folder, of the validation grid image (also shown in the Hub's gallery).
        example_files: whether the folder holds `EXAMPLE_FILES`, so the usage snippet can download them.
        tags: extra tags.
        toyworld_edit: for the adapter of the toy world's embedded model, the edit its snippet shows (a name
            `toyworld.make_pair` takes); the snippet loads the model with `toyworld.load_pipeline()`.
        toy_base: the adapter was trained on a toy-world base editor (a base that edits one image size, such as the
            embedded one): the card says so instead of naming a FLUX.2 [klein] checkpoint, and its snippet loads the
            embedded base with `toyworld.load_pipeline()` and this adapter onto it.
    """
    base_on_hub = base_model is not None and is_hub_repo_id(base_model)
    backbone = BACKBONES[adapter.config.backbone]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_model if base_on_hub else None,
        pipeline_tag="image-to-image",
        datasets=datasets or None,
        tags=DEFAULT_TAGS + [backbone.NAME] + [tag for tag in (tags or []) if tag not in DEFAULT_TAGS],
        **license_metadata(base_model if base_on_hub else None, license),
    )
    if base_on_hub:
        card_data.base_model_relation = "adapter"
    if validation_grid:
        card_data.widget = [
            {
                "text": "exemplar source, target | query | the query edited the same way",
                "output": {"url": validation_grid},
            }
        ]
    template = resources.files("diffusers_delta.hub_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")

    def shown(name: str) -> str:  # a local path shows as its folder's name
        return name if is_hub_repo_id(name) else os.path.basename(os.path.normpath(name))

    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        adapter_on_hub=is_hub_repo_id(repo_id),
        adapter_name=shown(repo_id),
        base_model=TOY_BASE_NAME if toy_base else shown(base_model) if base_model else f"a {backbone.FAMILY} base",
        family=backbone.FAMILY,
        toy_base=toy_base,
        pipeline_class=backbone.DELTA_PIPELINE,
        default_base=backbone.DEFAULT_BASE,
        text_free=", ".join(f"{name}=None" for name in backbone.TEXT_COMPONENTS),
        base_known=base_model is not None,
        base_on_hub=base_on_hub,
        licensed=bool(card_data.license),
        image_encoder=shown(image_encoder),
        num_edit_tokens=adapter.config.num_edit_tokens,
        edit_token_dim=adapter.config.edit_token_dim,
        num_parameters=f"{sum(p.numel() for p in adapter.parameters()):,}",
        training=training,
        adaptation=adaptation,
        validation_grid=validation_grid,
        example_files=EXAMPLE_FILES if example_files else None,
        toyworld_edit=toyworld_edit,
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Delta-Adapter",
) -> str:
    """Creates the Hub model repo if needed and uploads a saved folder (an adapter's weights, encoder, card and
    images, or a whole pipeline), leaving out training checkpoints, logs and staging folders.

    Args:
        folder: a folder written by `save_delta_adapter`, the training script or `save_pretrained`.
        repo_id: the target repo, `"org/name"`.
        token: a Hub token (defaults to the logged-in one).
        private: create the repo private.
        commit_message: the upload's commit message.

    Returns:
        The URL of the upload's commit.
    """
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp", ".*", ".*/**"],
    )
    return commit.commit_url
