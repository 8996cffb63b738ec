"""Delta-Adapter on Modular Diffusers: a pipeline block that turns an exemplar pair into edit tokens for the denoise
loop, a block for the stored empty prompt, the klein blocks with both, and a modular pipeline that loads, scales,
adapts and unloads the adapter as the classic pipelines do."""

from .blocks import DeltaAdapterStep, DeltaEmptyPromptStep, delta_blocks
from .pipeline import FluxDeltaModularPipeline


__all__ = ["DeltaAdapterStep", "DeltaEmptyPromptStep", "FluxDeltaModularPipeline", "delta_blocks"]
