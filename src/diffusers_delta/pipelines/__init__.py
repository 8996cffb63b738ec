"""The Delta-Adapter pipelines, one per backbone, and the choice of one for a base checkpoint."""

from .pipeline_flux_delta_edit import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from .pipeline_flux_kontext_delta_edit import FluxKontextDeltaEditPipeline


#: The Delta-Adapter pipeline of each backbone, by the name adapter configs record (`backbones`).
DELTA_PIPELINES = {pipeline.backbone: pipeline for pipeline in (FluxDeltaEditPipeline, FluxKontextDeltaEditPipeline)}


def delta_pipeline_for(base, **hub_kwargs) -> type:
    """The Delta-Adapter pipeline class for a base pipeline folder or Hub repo, by its `model_index.json`
    (`Flux2KleinPipeline` -> `FluxDeltaEditPipeline`, `FluxKontextPipeline` -> `FluxKontextDeltaEditPipeline`).
    Where the index cannot be read (a repo out of reach), `FluxDeltaEditPipeline`, whose `from_pretrained` then
    says why.

    Raises:
        ValueError: a base of no known backbone.
    """
    from diffusers import DiffusionPipeline

    from ..backbones import backbone_of_pipeline

    try:
        class_name = DiffusionPipeline.load_config(base, **hub_kwargs)["_class_name"]
    except (OSError, KeyError):
        return FluxDeltaEditPipeline
    return DELTA_PIPELINES[backbone_of_pipeline(class_name).NAME]


__all__ = [
    "DELTA_PIPELINES",
    "FluxDeltaEditPipeline",
    "FluxKontextDeltaEditPipeline",
    "compute_empty_prompt_embeds",
    "delta_pipeline_for",
]
