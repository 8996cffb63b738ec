"""FLUX.2 ([klein] and [dev], `Flux2Transformer2DModel`): what Delta-Adapter needs to know of this backbone.

- Its attention processors: `Flux2DeltaAttnProcessor` for the double-stream `Flux2Attention`,
  `Flux2DeltaParallelSelfAttnProcessor` for the single-stream `Flux2ParallelSelfAttention`.
- Its latents: VAE latents are 2x2-patchified and normalised with the VAE's batch-norm running statistics before the
  transformer sees them, then packed into token sequences; the objective noises the patchified grid (B, 4C, h, w).
- One prediction with a reference image, laid out as `Flux2KleinPipeline` lays it out.

Both processors also take the arguments of upstream's KV-cached processors (`Flux2KVAttnProcessor`,
`Flux2KVParallelSelfAttnProcessor`), so `Flux2KleinKVPipeline`'s loop runs through them: the reference tokens' keys
and values are extracted on the first step and reused after it exactly as upstream does, and the edit is added to
the queries that are there (with the reference tokens on the first step, without them after).
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVLayerCache,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
    _flux2_kv_causal_attention,
    _get_qkv_projections,
)
from transformers import Qwen3ForCausalLM

from ..attention_processor import Attend, DeltaBranch, delta_processors_for
from ..models.delta_adapter import DeltaAdapterModel


#: The name adapter configs record for this backbone, and how messages name it.
NAME = "flux2"
DISPLAY_NAME = "FLUX.2 (Flux2Transformer2DModel)"
TRANSFORMER_CLASS = Flux2Transformer2DModel
#: The pipeline components that encode a prompt.
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
#: How model cards and messages name the base family, the Delta-Adapter pipeline for it, and a base to start from.
FAMILY = "FLUX.2 [klein]"
DELTA_PIPELINE = "FluxDeltaEditPipeline"
DEFAULT_BASE = "black-forest-labs/FLUX.2-klein-4B"
#: The diffusers pipelines (`model_index.json`'s `_class_name`) whose folders hold this backbone, and its VAE class.
BASE_PIPELINES = ("Flux2KleinPipeline", "FluxDeltaEditPipeline", "Flux2KleinKVPipeline", "FluxDeltaKVEditPipeline")
VAE_CLASS = AutoencoderKLFlux2
#: The diffusers pipeline the text-only part of a base is built as, and its text encoders' classes by component.
PIPELINE_CLASS = Flux2KleinPipeline
TEXT_ENCODERS = {"text_encoder": Qwen3ForCausalLM}
#: The most pixels a query keeps (larger ones are scaled down to this area), as klein sizes its reference image.
MAX_QUERY_AREA = 1024 * 1024


def kv_cached_attention(
    kv_cache: Flux2KVLayerCache | None, kv_cache_mode: str | None, num_txt_tokens: int, num_ref_tokens: int, backend
) -> Attend | None:
    """Upstream's KV-cached attention for one layer and step, as `Flux2KVAttnProcessor` dispatches it, or None
    where it attends plainly (no KV caching asked for).

    Args:
        kv_cache: the layer's cache (filled on the "extract" step, read on the "cached" ones).
        kv_cache_mode: `"extract"` (the joint sequence is [text, reference, image]; the reference tokens' keys and
            values are stored and they attend only to themselves), `"cached"` ([text, image]; the stored reference
            keys and values are put back between them) or None.
        num_txt_tokens: the text tokens in front of the sequence.
        num_ref_tokens: the reference tokens after them ("extract" only).
        backend: the layer's attention backend.
    """
    if kv_cache_mode == "extract" and num_ref_tokens > 0:

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if kv_cache is not None:
                reference = slice(num_txt_tokens, num_txt_tokens + num_ref_tokens)
                kv_cache.store(key[:, reference].clone(), value[:, reference].clone())
            return _flux2_kv_causal_attention(query, key, value, num_txt_tokens, num_ref_tokens, backend=backend)

        return attend
    if kv_cache_mode == "cached" and kv_cache is not None:

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            return _flux2_kv_causal_attention(query, key, value, num_txt_tokens, 0, kv_cache=kv_cache, backend=backend)

        return attend
    return None


class Flux2DeltaAttnProcessor(DeltaBranch):
    """Processor for the double-stream `Flux2Attention`: the image stream's queries read the edit tokens. The
    `kv_cache*` and `num_ref_tokens` arguments are `Flux2KVAttnProcessor`'s (see `kv_cached_attention`).

    Args:
        block_projection: this block's `DeltaBlockProjection` (owned by the `DeltaAdapterModel`).
        scale: this block's strength, set by `set_delta_adapter_scale`.
    """

    def __call__(
        self,
        attn: Flux2Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        delta_hidden_states: torch.Tensor | None = None,
        delta_scale: float | None = None,
        kv_cache: Flux2KVLayerCache | None = None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        num_txt_tokens = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        attend = kv_cached_attention(kv_cache, kv_cache_mode, num_txt_tokens, num_ref_tokens, self._attention_backend)
        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        hidden_states, image_query = self._joint_attention(attn, projections, image_rotary_emb, attention_mask, attend)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        strength = self._strength(delta_hidden_states, delta_scale)
        if strength != 0.0:
            hidden_states = hidden_states + self._branch(image_query, delta_hidden_states, strength)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2DeltaParallelSelfAttnProcessor(DeltaBranch):
    """Processor for the single-stream `Flux2ParallelSelfAttention`: every token of the joint sequence reads the
    edit tokens, and the branch joins the attention half before the fused output projection. The `kv_cache*` and
    `num_*_tokens` arguments are `Flux2KVParallelSelfAttnProcessor`'s (see `kv_cached_attention`).

    Args:
        block_projection: this block's `DeltaBlockProjection` (owned by the `DeltaAdapterModel`).
        scale: this block's strength, set by `set_delta_adapter_scale`.
    """

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        delta_hidden_states: torch.Tensor | None = None,
        delta_scale: float | None = None,
        kv_cache: Flux2KVLayerCache | None = None,
        kv_cache_mode: str | None = None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
    ) -> torch.Tensor:
        attend = kv_cached_attention(kv_cache, kv_cache_mode, num_txt_tokens, num_ref_tokens, self._attention_backend)
        projected = attn.to_qkv_mlp_proj(hidden_states)  # (B, S, 3 * inner + mlp)
        # Split by the global QKV:MLP ratio, as upstream does, so column-sharded (tensor-parallel) weights work too.
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)

        query, key, value = self._heads(attn, *qkv.chunk(3, dim=-1))  # (B, S, H, D) each
        attn_output = self._self_attention(
            query, key, value, image_rotary_emb, attention_mask, attend
        )  # (B, S, H * D)

        strength = self._strength(delta_hidden_states, delta_scale)
        if strength != 0.0:
            attn_output = attn_output + self._branch(query, delta_hidden_states, strength)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([attn_output, mlp_hidden_states], dim=-1))


def block_counts(config) -> tuple[int, int]:
    """The adapter's (double, single) block counts for a transformer config: its double- and single-stream blocks."""
    return config.num_layers, config.num_single_layers


def release(transformer) -> None:
    """Nothing to take off: the edit tokens reach the processors through `joint_attention_kwargs`."""


def use_kv_cached_processors(transformer: Flux2Transformer2DModel) -> None:
    """Upstream's KV-cached processors where the transformer has upstream's plain ones (as `Flux2KleinKVPipeline`
    sets them up; they attend as the plain ones when no KV caching is asked for); any other processor (a loaded
    Delta-Adapter's, a user's) is kept."""
    for block in transformer.transformer_blocks:
        if type(block.attn.processor) is Flux2AttnProcessor:
            block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        if type(block.attn.processor) is Flux2ParallelSelfAttnProcessor:
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


def processors_for(transformer: Flux2Transformer2DModel, adapter: DeltaAdapterModel) -> dict[str, DeltaBranch]:
    """One Delta-Adapter processor per attention layer of a FLUX.2 transformer (see `delta_processors_for`)."""
    return delta_processors_for(
        transformer, adapter, {"double": Flux2DeltaAttnProcessor, "single": Flux2DeltaParallelSelfAttnProcessor}
    )


def latent_statistics(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm mean and standard deviation, (1, 4C, 1, 1) each, on `like`'s device and dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


@torch.no_grad()
def encode_latents(vae: AutoencoderKLFlux2, pixels: torch.Tensor) -> torch.Tensor:
    """Images -> normalised, patchified latents, as the pipeline encodes its reference image.

    Args:
        vae: FLUX.2's VAE.
        pixels: (B, 3, H, W) in [-1, 1].

    Returns:
        (B, 4C, H / 2f, W / 2f) for a VAE that downsamples f times (f = 8 for FLUX.2's).
    """
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()  # (B, C, H / f, W / f)
    latents = Flux2KleinPipeline._patchify_latents(latents)  # (B, 4C, H / 2f, W / 2f)
    mean, std = latent_statistics(vae, latents)
    return (latents - mean) / std


def unpack_to_vae_latents(
    vae: AutoencoderKLFlux2, packed_latents: torch.Tensor, latent_ids: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Packed, normalised tokens -> the VAE's own latents, ready for `vae.decode`.

    Args:
        vae: FLUX.2's VAE.
        packed_latents: (B, h·w, 4C) as the transformer sees them.
        latent_ids: (B, h·w, 4) their position ids.
        height: h, the patchified latent height.
        width: w, the patchified latent width.

    Returns:
        (B, C, 2h, 2w).
    """
    latents = Flux2KleinPipeline._unpack_latents_with_ids(packed_latents, latent_ids, height, width)  # (B, 4C, h, w)
    mean, std = latent_statistics(vae, latents)
    return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) patchified latents -> (B, hw, 4C) tokens, in the order `Flux2KleinPipeline` packs them."""
    return Flux2KleinPipeline._pack_latents(latents)


def decode_tokens(vae: AutoencoderKLFlux2, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, hw, 4C) tokens of an (h, w) patchified grid -> images in [0, 1], (B, 3, H, W), differentiably."""
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(tokens.new_empty(tokens.shape[0], 1, height, width))
    latents = unpack_to_vae_latents(vae, tokens, latent_ids.to(tokens.device), height, width)  # (B, C, 2h, 2w)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, H, W) in about [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def preprocess_query(pipe: Flux2KleinPipeline, rgb: PIL.Image.Image) -> torch.Tensor:
    """A query as `Flux2KleinPipeline` sizes its reference image: its own size, scaled down to `MAX_QUERY_AREA` when
    larger, cropped to multiples of 16 -> (1, 3, H, W) in [-1, 1]."""
    if rgb.width * rgb.height > MAX_QUERY_AREA:
        rgb = pipe.image_processor._resize_to_target_area(rgb, MAX_QUERY_AREA)
    multiple_of = pipe.vae_scale_factor * 2
    height, width = (rgb.height // multiple_of) * multiple_of, (rgb.width // multiple_of) * multiple_of
    return pipe.image_processor.preprocess(rgb, height=height, width=width, resize_mode="crop")


@torch.no_grad()
def encode_prompt(
    pipe: Flux2KleinPipeline, prompt: str, max_sequence_length: int, text_encoder_out_layers: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """A prompt's conditioning with the pipeline's Qwen3: `prompt_embeds` (1, L, D_txt)."""
    prompt_embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(  # a static method: modular pipelines lack it
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        prompt=prompt,
        device=pipe._execution_device,
        max_sequence_length=max_sequence_length,
        hidden_states_layers=text_encoder_out_layers,
    )
    return {"prompt_embeds": prompt_embeds}


def training_conditioning() -> dict[str, torch.Tensor]:
    """What the objective takes beside the prompt's embeddings: nothing for klein (no guidance embedding)."""
    return {}


def predict_velocity(
    transformer: Flux2Transformer2DModel,
    noisy_latents: torch.Tensor,
    reference_latents: torch.Tensor,
    text_conditioning: dict[str, torch.Tensor],
    sigmas: torch.Tensor,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FLUX.2 [klein] prediction with a reference image, laid out as the pipeline lays it out.

    Args:
        transformer: the FLUX.2 transformer.
        noisy_latents: (B, 4C, h, w) x_t, normalised and patchified.
        reference_latents: (B, 4C, h, w) the reference (query) image's latents, ridden as extra tokens.
        text_conditioning: `prompt_embeds`, (1 or B, L, D_txt) prompt embeddings.
        sigmas: (B,) noise levels (klein's timestep / 1000 is σ on the training grid).
        joint_attention_kwargs: passed to the attention processors (e.g. `delta_hidden_states`).

    Returns:
        The velocity for the noisy tokens (B, hw, 4C) and the packed noisy latents (B, hw, 4C).
    """
    batch_size = noisy_latents.shape[0]
    device, dtype = noisy_latents.device, transformer.dtype
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(device)  # (B, hw, 4)
    reference_ids = Flux2KleinPipeline._prepare_image_ids([reference_latents[:1]]).to(device)  # (1, hw, 4)
    packed_noisy = Flux2KleinPipeline._pack_latents(noisy_latents)  # (B, hw, 4C)
    model_input = torch.cat([packed_noisy, Flux2KleinPipeline._pack_latents(reference_latents)], dim=1)
    image_ids = torch.cat([latent_ids, reference_ids.expand(batch_size, -1, -1)], dim=1)  # (B, 2hw, 4)
    prompt_embeds = text_conditioning["prompt_embeds"].expand(batch_size, -1, -1).to(dtype)  # (B, L, D_txt)
    velocity = transformer(
        hidden_states=model_input.to(dtype),
        timestep=sigmas.to(device, dtype),
        guidance=None,
        encoder_hidden_states=prompt_embeds,
        txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device),
        img_ids=image_ids,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0][:, : packed_noisy.shape[1]]  # predictions for the noisy tokens only
    return velocity, packed_noisy
