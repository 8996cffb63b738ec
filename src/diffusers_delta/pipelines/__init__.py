from .pipeline_flux_delta_edit import FluxDeltaEditPipeline, compute_empty_prompt_embeds


__all__ = ["FluxDeltaEditPipeline", "compute_empty_prompt_embeds"]
