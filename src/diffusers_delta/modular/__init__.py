"""Delta-Adapter on Modular Diffusers: a pipeline block that turns an exemplar pair into edit tokens for the denoise
loop, a block for the stored empty prompt, upstream's blocks with both, and modular pipelines (klein, Kontext,
FLUX.3) that load, scale, adapt and unload the adapter as the classic pipelines do."""

from .blocks import DeltaAdapterStep, DeltaEmptyPromptStep, delta_blocks
from .pipeline import (
    DeltaModularPipelineMixin,
    Flux3DeltaModularPipeline,
    Flux3DistilledDeltaModularPipeline,
    FluxDeltaModularPipeline,
    FluxKontextDeltaModularPipeline,
)


__all__ = [
    "DeltaAdapterStep",
    "DeltaEmptyPromptStep",
    "DeltaModularPipelineMixin",
    "Flux3DeltaModularPipeline",
    "Flux3DistilledDeltaModularPipeline",
    "FluxDeltaModularPipeline",
    "FluxKontextDeltaModularPipeline",
    "delta_blocks",
]
