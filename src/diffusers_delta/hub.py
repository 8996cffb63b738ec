"""Model cards and Hub uploads for Delta-Adapter folders.

Cards are rendered from `hub_cards/delta_adapter_card.md` (installed as `diffusers_delta.hub_cards`) with
huggingface_hub's `ModelCard` / `ModelCardData`, so the metadata is what the Hub and diffusers users expect:
`library_name: diffusers`, `base_model`, `pipeline_tag: image-to-image`, tags, license, datasets.
"""

from __future__ import annotations

import os
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from .models.delta_adapter import DeltaAdapterModel


CARD_TEMPLATE = "delta_adapter_card.md"
DEFAULT_TAGS = ["diffusers", "diffusers-delta", "delta-adapter", "image-editing", "exemplar-based-editing", "flux2"]
#: Files a rendered card's usage snippet downloads when the folder holds the validation exemplar.
EXAMPLE_FILES = ("examples/source.png", "examples/target.png", "examples/query.png")


def render_model_card(
    adapter: DeltaAdapterModel,
    repo_id: str,
    base_model: str,
    image_encoder: str,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training: dict | None = None,
    adaptation: dict | None = None,
    validation_grid: str | None = None,
    example_files: bool = False,
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card of a Delta-Adapter.

    Args:
        adapter: the adapter (its config and size go into the card).
        repo_id: the Hub repo the card's usage snippet loads (`"org/name"`), or a folder path.
        base_model: the FLUX.2 [klein] checkpoint it was trained for.
        image_encoder: the SigLIP checkpoint it reads exemplars with.
        license: the adapter's license (klein-4B is Apache-2.0; klein-9B has its own non-commercial license).
        datasets: Hub datasets it was trained on.
        training: training settings to list (name -> value).
        adaptation: for a test-time-adapted adapter: `base_adapter`, `num_steps`, `learning_rate`, `lambda_delta`.
        validation_grid: path, inside the folder, of the validation grid image.
        example_files: whether the folder holds `EXAMPLE_FILES`, so the usage snippet can download them.
        tags: extra tags.
    """
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        pipeline_tag="image-to-image",
        license=license,
        datasets=datasets or None,
        tags=DEFAULT_TAGS + [tag for tag in (tags or []) if tag not in DEFAULT_TAGS],
    )
    template = resources.files("diffusers_delta.hub_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        base_model=base_model,
        image_encoder=image_encoder,
        num_edit_tokens=adapter.config.num_edit_tokens,
        edit_token_dim=adapter.config.edit_token_dim,
        num_parameters=f"{sum(p.numel() for p in adapter.parameters()):,}",
        training=training,
        adaptation=adaptation,
        validation_grid=validation_grid,
        example_files=EXAMPLE_FILES if example_files else None,
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
