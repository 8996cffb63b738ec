from .pipeline_flux_delta_edit import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from .pipeline_flux_kontext_delta_edit import FluxKontextDeltaEditPipeline


#: The Delta-Adapter pipeline of each backbone, by the name adapter configs record (`backbones`).
DELTA_PIPELINES = {"flux2": FluxDeltaEditPipeline, "flux1": FluxKontextDeltaEditPipeline}

__all__ = ["DELTA_PIPELINES", "FluxDeltaEditPipeline", "FluxKontextDeltaEditPipeline", "compute_empty_prompt_embeds"]
