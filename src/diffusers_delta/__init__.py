"""diffusers-delta: edit an image by example (Delta-Adapter) on FLUX.2 [klein], in the diffusers way."""

from .attention_processor import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor
from .loaders import DeltaAdapterMixin
from .models import DeltaAdapterModel
from .pipelines import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from .semantic_delta import SiglipPreprocessor, semantic_delta


__version__ = "0.1.0.dev0"

__all__ = [
    "DeltaAdapterMixin",
    "DeltaAdapterModel",
    "Flux2DeltaAttnProcessor",
    "Flux2DeltaParallelSelfAttnProcessor",
    "FluxDeltaEditPipeline",
    "SiglipPreprocessor",
    "compute_empty_prompt_embeds",
    "semantic_delta",
]
