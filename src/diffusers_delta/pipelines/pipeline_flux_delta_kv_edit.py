"""`FluxDeltaKVEditPipeline`: exemplar edits on FLUX.2 [klein] with the query's keys and values computed once, as
`Flux2KleinKVPipeline` (klein-9B-KV) computes its reference image's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

from ..backbones.flux2 import use_kv_cached_processors
from .pipeline_flux_delta_edit import FluxDeltaEditPipeline


class FluxDeltaKVEditPipeline(FluxDeltaEditPipeline):
    r"""Exemplar-based image editing with Delta-Adapter on a KV-cached FLUX.2 [klein] (`Flux2KleinKVPipeline`'s
    loop): on the first step the query (the reference image) goes through the transformer with the noisy latents
    and every layer stores its keys and values; later steps run the noisy latents alone and attend to the stored
    ones. The edit reaches every block as in `FluxDeltaEditPipeline`: with the query's tokens on the first step (so
    the stored keys and values carry it), the noisy ones after. With `delta_scale=0` it is `Flux2KleinKVPipeline`
    exactly; with guidance (a non-distilled base), the unedited pass keeps keys and values of its own.

    Load it like the klein pipeline: `FluxDeltaKVEditPipeline.from_pretrained("black-forest-labs/FLUX.2-klein-9B-KV",
    ...)`, or `FluxDeltaKVEditPipeline.from_pipe(pipe)` to share a loaded `FluxDeltaEditPipeline`'s models and
    adapter. Arguments and call as `FluxDeltaEditPipeline`'s.
    """

    def _install_base_processors(self) -> None:
        """Upstream's KV-cached processors, as `Flux2KleinKVPipeline` sets them up (an adapter's replace them and
        take the same arguments; `unload_delta_adapter` puts these back)."""
        use_kv_cached_processors(self.transformer)

    def _velocity_predictor(
        self, latent_ids: torch.Tensor, image_latents: torch.Tensor, image_latent_ids: torch.Tensor
    ) -> Callable[..., torch.Tensor]:
        """As `FluxDeltaEditPipeline._velocity_predictor`, the way `Flux2KleinKVPipeline` lays a step out: each
        pass (`cache_name`) extracts its reference keys and values on its first step, [reference, noisy] tokens
        with the reference at a fixed timestep, and attends to them on the later steps with the noisy tokens alone.
        The caches live as long as the returned function."""
        caches: dict[str, Flux2KVCache] = {}
        extract_ids = torch.cat([image_latent_ids, latent_ids], dim=1)  # (B, 2hw, 4): reference first

        def predict(latents, prompt_embeds, text_ids, timestep, cache_name, attention_kwargs, step=None):
            common = {
                "timestep": timestep / 1000,
                "guidance": None,
                "encoder_hidden_states": prompt_embeds,
                "txt_ids": text_ids,
                "joint_attention_kwargs": attention_kwargs,
                "return_dict": False,
            }
            with self.transformer.cache_context(cache_name, **(step or {})):
                if cache_name not in caches:
                    model_input = torch.cat([image_latents, latents], dim=1).to(self.transformer.dtype)
                    prediction, caches[cache_name] = self.transformer(
                        hidden_states=model_input,
                        img_ids=extract_ids,
                        kv_cache_mode="extract",
                        num_ref_tokens=image_latents.shape[1],
                        **common,
                    )  # the noisy tokens' predictions only
                else:
                    prediction = self.transformer(
                        hidden_states=latents.to(self.transformer.dtype),
                        img_ids=latent_ids,
                        kv_cache=caches[cache_name],
                        kv_cache_mode="cached",
                        **common,
                    )[0]
            return prediction

        return predict
