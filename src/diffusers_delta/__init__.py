"""diffusers-delta: edit an image by example (Delta-Adapter) on FLUX.2 [klein] and FLUX.1 Kontext, in the diffusers
way."""

from . import notices  # noqa: F401  (first: it quiets a notice diffusers' imports would print; see notices.py)
from .backbones.flux1 import FluxDeltaAttnProcessor
from .backbones.flux2 import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor
from .loaders import DeltaAdapterMixin
from .models import DeltaAdapterModel
from .pipelines import (
    FluxDeltaEditPipeline,
    FluxDeltaInpaintPipeline,
    FluxDeltaKVEditPipeline,
    FluxKontextDeltaEditPipeline,
    compute_empty_prompt_embeds,
)
from .semantic_delta import SiglipPreprocessor, semantic_delta
from .version import __version__


__all__ = [
    "__version__",
    "DeltaAdapterMixin",
    "DeltaAdapterModel",
    "Flux2DeltaAttnProcessor",
    "Flux2DeltaParallelSelfAttnProcessor",
    "FluxDeltaAttnProcessor",
    "FluxDeltaEditPipeline",
    "FluxDeltaInpaintPipeline",
    "FluxDeltaKVEditPipeline",
    "FluxKontextDeltaEditPipeline",
    "SiglipPreprocessor",
    "compute_empty_prompt_embeds",
    "semantic_delta",
]
