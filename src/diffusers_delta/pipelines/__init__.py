from .pipeline_flux_delta_edit import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from .pipeline_flux_kontext_delta_edit import FluxKontextDeltaEditPipeline


__all__ = ["FluxDeltaEditPipeline", "FluxKontextDeltaEditPipeline", "compute_empty_prompt_embeds"]
