"""FLUX.1 (Kontext [dev], `FluxTransformer2DModel`): what Delta-Adapter needs to know of this backbone.

- Its attention processor: `FluxDeltaAttnProcessor`, for `FluxAttention` in double-stream blocks (image queries read
  the edit tokens) and in single-stream blocks (every token of the joint sequence does), where upstream's
  `FluxAttnProcessor` runs.
- Its latents: VAE latents shifted and scaled by the VAE's config, which the objective noises (B, C, h, w), packed
  2x2 into (B, hw / 4, 4C) tokens.
- One prediction with a reference image, laid out as `FluxKontextPipeline` lays it out: the reference's tokens after
  the noisy ones, their position ids with first coordinate 1, T5 and pooled CLIP prompt embeddings, and the distilled
  guidance embedding.
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention, _get_qkv_projections
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from transformers import CLIPTextModel, T5EncoderModel

from ..attention_processor import DeltaBranch, delta_processors_for
from ..models.delta_adapter import DeltaAdapterModel


#: The name adapter configs record for this backbone, and how messages name it.
NAME = "flux1"
DISPLAY_NAME = "FLUX.1 (FluxTransformer2DModel)"
TRANSFORMER_CLASS = FluxTransformer2DModel
#: The pipeline components that encode a prompt.
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
#: How model cards and messages name the base family, the Delta-Adapter pipeline for it, and a base to start from.
FAMILY = "FLUX.1 Kontext [dev]"
DELTA_PIPELINE = "FluxKontextDeltaEditPipeline"
DEFAULT_BASE = "black-forest-labs/FLUX.1-Kontext-dev"
#: The diffusers pipelines (`model_index.json`'s `_class_name`) whose folders hold this backbone, and its VAE class.
BASE_PIPELINES = ("FluxKontextPipeline", "FluxKontextDeltaEditPipeline")
VAE_CLASS = AutoencoderKL
#: The diffusers pipeline the text-only part of a base is built as, and its text encoders' classes by component.
PIPELINE_CLASS = FluxKontextPipeline
TEXT_ENCODERS = {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}
#: The distilled guidance the adapter trains and adapts under: `FluxKontextPipeline`'s default.
TRAINING_GUIDANCE = 3.5


class FluxDeltaAttnProcessor(DeltaBranch):
    """Processor for FLUX.1's `FluxAttention`: upstream's `FluxAttnProcessor` plus the decoupled branch.

    In a double-stream block (with `encoder_hidden_states`) the image stream's queries read the edit tokens and the
    branch joins before `to_out`; in a single-stream block every token's query does, and the branch joins the
    attention output the block then concatenates with its MLP half.

    Args:
        block_projection: this block's `DeltaBlockProjection` (owned by the `DeltaAdapterModel`).
        scale: this block's strength, set by `set_delta_adapter_scale`.
    """

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        delta_hidden_states: torch.Tensor | None = None,
        delta_scale: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        hidden_states, branch_query = self._joint_attention(attn, projections, image_rotary_emb, attention_mask)
        strength = self._strength(delta_hidden_states, delta_scale)

        if encoder_hidden_states is None:  # single-stream block: the block projects [attention, MLP] itself
            if strength != 0.0:
                hidden_states = hidden_states + self._branch(branch_query, delta_hidden_states, strength)
            return hidden_states

        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        if strength != 0.0:
            hidden_states = hidden_states + self._branch(branch_query, delta_hidden_states, strength)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def block_counts(config) -> tuple[int, int]:
    """The adapter's (double, single) block counts for a transformer config: its double- and single-stream blocks."""
    return config.num_layers, config.num_single_layers


def release(transformer) -> None:
    """Nothing to take off: the edit tokens reach the processors through `joint_attention_kwargs`."""


def processors_for(transformer: FluxTransformer2DModel, adapter: DeltaAdapterModel) -> dict[str, DeltaBranch]:
    """One Delta-Adapter processor per attention layer of a FLUX.1 transformer (see `delta_processors_for`)."""
    return delta_processors_for(
        transformer, adapter, {"double": FluxDeltaAttnProcessor, "single": FluxDeltaAttnProcessor}
    )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Images -> shifted and scaled latents, as `FluxKontextPipeline` encodes its reference image.

    Args:
        vae: FLUX.1's VAE.
        pixels: (B, 3, H, W) in [-1, 1].

    Returns:
        (B, C, H / f, W / f) for a VAE that downsamples f times (f = 8 and C = 16 for FLUX.1's).
    """
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()  # (B, C, H / f, W / f)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, hw / 4, 4C) tokens of 2x2 patches, as `FluxKontextPipeline` packs them."""
    return FluxKontextPipeline._pack_latents(latents, *latents.shape)


def decode_tokens(vae: AutoencoderKL, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, hw / 4, 4C) tokens of an (h, w) latent grid -> images in [0, 1], (B, 3, H, W), differentiably."""
    latents = FluxKontextPipeline._unpack_latents(tokens, height, width, 1)  # (B, C, h, w)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, H, W) in about [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def reference_size(pipe: FluxKontextPipeline, rgb: PIL.Image.Image, auto_resize: bool = True) -> tuple[int, int]:
    """(height, width) `FluxKontextPipeline` gives its reference image: with `auto_resize`, the preferred Kontext
    resolution nearest the image's aspect ratio, else its own size; rounded down to multiples of 16."""
    height, width = rgb.height, rgb.width
    if auto_resize:
        _, width, height = min((abs(rgb.width / rgb.height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple_of = pipe.vae_scale_factor * 2
    return height // multiple_of * multiple_of, width // multiple_of * multiple_of


def preprocess_query(pipe: FluxKontextPipeline, rgb: PIL.Image.Image) -> torch.Tensor:
    """A query as `FluxKontextPipeline` preprocesses its reference image -> (1, 3, H, W) in [-1, 1] (a model that
    knows one `image_size` keeps the query's size, as `FluxKontextDeltaEditPipeline` does)."""
    height, width = reference_size(pipe, rgb, auto_resize=pipe.config.get("image_size") is None)
    return pipe.image_processor.preprocess(pipe.image_processor.resize(rgb, height, width), height, width)


@torch.no_grad()
def encode_prompt(
    pipe: FluxKontextPipeline, prompt: str, max_sequence_length: int, text_encoder_out_layers=None
) -> dict[str, torch.Tensor]:
    """A prompt's conditioning with the pipeline's T5 and CLIP: `prompt_embeds` (1, L, D_t5) and
    `pooled_prompt_embeds` (1, D_clip) (`text_encoder_out_layers` is FLUX.2's, unused here)."""
    prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def training_conditioning() -> dict[str, torch.Tensor]:
    """What the objective takes beside the prompt's embeddings: the distilled guidance (`TRAINING_GUIDANCE`)."""
    return {"guidance": torch.full([1], TRAINING_GUIDANCE, dtype=torch.float32)}


def predict_velocity(
    transformer: FluxTransformer2DModel,
    noisy_latents: torch.Tensor,
    reference_latents: torch.Tensor,
    text_conditioning: dict[str, torch.Tensor],
    sigmas: torch.Tensor,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FLUX.1 Kontext prediction with a reference image, laid out as the pipeline lays it out.

    Args:
        transformer: the FLUX.1 transformer.
        noisy_latents: (B, C, h, w) x_t, shifted and scaled.
        reference_latents: (B, C, h, w) the reference (query) image's latents, ridden as extra tokens.
        text_conditioning: `prompt_embeds` (1 or B, L, D_t5), `pooled_prompt_embeds` (1 or B, D_clip) and, for a
            guidance-distilled transformer, `guidance` (a one-element tensor: the distilled guidance scale).
        sigmas: (B,) noise levels (Kontext's timestep / 1000 is σ on the training grid).
        joint_attention_kwargs: passed to the attention processors (e.g. `delta_hidden_states`).

    Returns:
        The velocity for the noisy tokens (B, hw / 4, 4C) and the packed noisy latents (B, hw / 4, 4C).
    """
    batch_size, _, height, width = noisy_latents.shape
    device, dtype = noisy_latents.device, transformer.dtype
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
    reference_ids = latent_ids.clone()
    reference_ids[..., 0] = 1  # the reference's first position coordinate, as Kontext marks it
    packed_noisy = pack_latents(noisy_latents)  # (B, hw / 4, 4C)
    model_input = torch.cat([packed_noisy, pack_latents(reference_latents)], dim=1)  # (B, hw / 2, 4C)
    prompt_embeds = text_conditioning["prompt_embeds"].expand(batch_size, -1, -1).to(dtype)  # (B, L, D_t5)
    pooled = text_conditioning["pooled_prompt_embeds"].expand(batch_size, -1).to(dtype)  # (B, D_clip)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = text_conditioning["guidance"].to(device, torch.float32).expand(batch_size)
    velocity = transformer(
        hidden_states=model_input.to(dtype),
        timestep=sigmas.to(device, dtype),
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=torch.cat([latent_ids, reference_ids], dim=0),  # (hw / 2, 3)
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0][:, : packed_noisy.shape[1]]  # predictions for the noisy tokens only
    return velocity, packed_noisy
