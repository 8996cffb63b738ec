"""`KleinDeltaPipelineMixin`: what every Delta-Adapter pipeline on a FLUX.2 [klein] pipeline shares: its components
(the base's, plus SigLIP and the adapter), their offloading, and a constructor that routes the transformer through
an adapter given with them."""

from __future__ import annotations

from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM, SiglipImageProcessorPil, SiglipVisionModel

from ..models.delta_adapter import DeltaAdapterModel
from .delta_edit_pipeline import DeltaEditPipelineMixin


class KleinDeltaPipelineMixin(DeltaEditPipelineMixin):
    """Put before a klein pipeline class (`Flux2KleinPipeline`, `Flux2KleinInpaintPipeline`, whose constructors take
    the same components): `FluxDeltaEditPipeline`, `FluxDeltaKVEditPipeline`, `FluxDeltaInpaintPipeline`.

    Its constructor takes the base's components and the adapter's (the Args of `FluxDeltaEditPipeline`).
    """

    #: The backbone it runs on (`backbones`), as adapter configs name it.
    backbone = "flux2"
    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer", "image_encoder", "feature_extractor", "delta_adapter"]
    # The processors call the adapter's per-block weights inside the transformer's forward, so the (small) adapter
    # stays on the accelerator instead of being offloaded as a model of its own.
    _exclude_from_cpu_offload = ["delta_adapter"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        text_encoder: Qwen3ForCausalLM | None,
        tokenizer: Qwen2TokenizerFast | None,
        transformer: Flux2Transformer2DModel,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessorPil | None = None,
        delta_adapter: DeltaAdapterModel | None = None,
        is_distilled: bool = False,
        image_size: int | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
        self._install_base_processors()
        self._register_delta_components(image_encoder, feature_extractor, delta_adapter, image_size)

    def _install_base_processors(self) -> None:
        """The base pipeline's own attention processors, set before an adapter's replace them (and restored by
        `unload_delta_adapter`): klein's are the transformer's defaults."""
