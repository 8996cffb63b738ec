"""The Delta-Adapter pipelines, one per backbone, and the choice of one for a base checkpoint."""

from ..modular import Flux3DeltaModularPipeline, Flux3DistilledDeltaModularPipeline
from .pipeline_flux_delta_edit import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from .pipeline_flux_delta_inpaint import FluxDeltaInpaintPipeline
from .pipeline_flux_delta_kv_edit import FluxDeltaKVEditPipeline
from .pipeline_flux_kontext_delta_edit import FluxKontextDeltaEditPipeline


#: The Delta-Adapter pipeline of each backbone, by the name adapter configs record (`backbones`).
DELTA_PIPELINES = {pipeline.backbone: pipeline for pipeline in (FluxDeltaEditPipeline, FluxKontextDeltaEditPipeline)}

#: Bases whose Delta-Adapter pipeline is not their backbone's default one, by `model_index.json`'s `_class_name` (or
#: `modular_model_index.json`'s: FLUX.3 has only modular pipelines).
DELTA_PIPELINES_OF_BASES = {
    "Flux2KleinKVPipeline": FluxDeltaKVEditPipeline,
    "FluxDeltaKVEditPipeline": FluxDeltaKVEditPipeline,
    "Flux3ModularPipeline": Flux3DeltaModularPipeline,
    "Flux3DeltaModularPipeline": Flux3DeltaModularPipeline,
    "Flux3DistilledModularPipeline": Flux3DistilledDeltaModularPipeline,
    "Flux3DistilledDeltaModularPipeline": Flux3DistilledDeltaModularPipeline,
}


def delta_pipeline_for(base, **hub_kwargs) -> type:
    """The Delta-Adapter pipeline class for a base pipeline folder or Hub repo, by its `model_index.json`
    (`Flux2KleinPipeline` -> `FluxDeltaEditPipeline`, `Flux2KleinKVPipeline` -> `FluxDeltaKVEditPipeline`,
    `FluxKontextPipeline` -> `FluxKontextDeltaEditPipeline`) or FLUX.3's `modular_model_index.json`
    (`Flux3ModularPipeline` -> `Flux3DeltaModularPipeline`, `Flux3DistilledModularPipeline` ->
    `Flux3DistilledDeltaModularPipeline`: modular pipelines, whose components load with `load_components`).
    Where no index can be read (a repo out of reach), `FluxDeltaEditPipeline`, whose `from_pretrained` then says why.

    Raises:
        ValueError: a base of no known backbone.
    """
    from ..backbones import backbone_of_pipeline, pipeline_class_name

    try:
        class_name = pipeline_class_name(base, **hub_kwargs)
    except (OSError, KeyError):
        return FluxDeltaEditPipeline
    if class_name in DELTA_PIPELINES_OF_BASES:
        return DELTA_PIPELINES_OF_BASES[class_name]
    return DELTA_PIPELINES[backbone_of_pipeline(class_name).NAME]


__all__ = [
    "DELTA_PIPELINES",
    "DELTA_PIPELINES_OF_BASES",
    "FluxDeltaInpaintPipeline",
    "FluxDeltaKVEditPipeline",
    "FluxDeltaEditPipeline",
    "FluxKontextDeltaEditPipeline",
    "compute_empty_prompt_embeds",
    "delta_pipeline_for",
]
