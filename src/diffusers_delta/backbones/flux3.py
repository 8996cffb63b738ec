"""FLUX.3 (`Flux3Transformer2DModel`): what Delta-Adapter needs to know of this backbone.

FLUX.3 runs each token mode through early blocks of its own (`mode_blocks["image"]` for the noisy image,
`mode_blocks["image_cond"]` for the reference image, `txt_mode_blocks` for the text), then every token through joint
single blocks. The decoupled branch runs where the paper's "every double- and single-stream block" puts it: in the
image modes' early blocks (the analogue of FLUX.2's double-stream blocks, whose image stream reads the edit tokens;
the adapter's "double" blocks are the noisy image's, then the reference's) and in every single block; the text's
early blocks keep upstream's processor. See the design notes for what the other choices cost.

FLUX.3's blocks pass no keyword arguments to their attention, so the edit tokens cannot ride in the transformer's
`attention_kwargs` down to the processors as on FLUX.1 and FLUX.2: a forward pre-hook takes `delta_hidden_states`
and `delta_scale` out of `attention_kwargs` and puts them into a `DeltaCall` the processors read. That state is the
transformer's, so one FLUX.3 transformer edits one call at a time.

Its latents are FLUX.2's (the same VAE, 2x2-patchified and batch-norm normalised), packed row by row.
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, Flux3Transformer2DModel
from diffusers.models.transformers.transformer_flux3 import Flux3Attention, _get_qkv_projections
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

from ..attention_processor import BlockPlace, DeltaBranch, delta_processors_for
from ..models.delta_adapter import DeltaAdapterModel

# FLUX.3's latents are FLUX.2's (the same VAE, patchified and normalised with its batch-norm statistics): these are
# this backbone's names too.
from .flux2 import decode_tokens, encode_latents, latent_statistics, pack_latents  # noqa: F401


#: The name adapter configs record for this backbone, and how messages name it.
NAME = "flux3"
DISPLAY_NAME = "FLUX.3 (Flux3Transformer2DModel)"
TRANSFORMER_CLASS = Flux3Transformer2DModel
#: The pipeline components that encode a prompt (Qwen3-VL and its processor).
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
#: How model cards and messages name the base family and the Delta-Adapter pipeline for it. No FLUX.3 repo id is
#: public where this was written, so cards name none.
FAMILY = "FLUX.3"
DELTA_PIPELINE = "Flux3DeltaModularPipeline"
DEFAULT_BASE = None
#: The pipelines (`modular_model_index.json`'s `_class_name`) whose folders hold this backbone, and its VAE class.
BASE_PIPELINES = ("Flux3ModularPipeline", "Flux3DistilledModularPipeline", "Flux3DeltaModularPipeline")
VAE_CLASS = AutoencoderKLFlux2
#: FLUX.3 has no classic diffusers pipeline: its text-only part is built on the modular side.
PIPELINE_CLASS = None
#: The image position ids' scale FLUX.3 was trained with (upstream's `Flux3PrepareLatentsStep` default).
IMAGE_ROPE_SCALE = 0.5
#: The keys of `attention_kwargs` that carry the edit, which the pre-hook takes out before upstream's forward.
EDIT_KWARGS = ("delta_hidden_states", "delta_scale")


class DeltaCall:
    """The edit tokens and strength of the transformer's current forward, which its pre-hook sets and its
    Delta-Adapter processors read (FLUX.3's blocks pass their attention no keyword arguments)."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None  # (B, N, D_edit)
        self.scale: float | None = None
        self.handle = None  # the pre-hook's handle
        self.edit_off = False  # set around a guider's unconditional pass (`NoEditGuidance`): the edit is left out

    def take(self, module, args, kwargs):
        """The forward pre-hook: moves the edit's keys of `attention_kwargs` here (None when the call has none)."""
        attention_kwargs = kwargs.get("attention_kwargs") or {}
        self.tokens = attention_kwargs.get("delta_hidden_states")
        self.scale = 0.0 if self.edit_off else attention_kwargs.get("delta_scale")
        if not any(key in attention_kwargs for key in EDIT_KWARGS):
            return None
        rest = {key: value for key, value in attention_kwargs.items() if key not in EDIT_KWARGS}
        kwargs["attention_kwargs"] = rest or None
        return args, kwargs


class Flux3DeltaAttnProcessor(DeltaBranch):
    """Processor for `Flux3Attention` in an image mode's early block or a joint single block: upstream's attention,
    plus the branch from the queries (after `norm_q`, before RoPE) to this call's edit tokens.

    Args:
        block_projection: this block's `DeltaBlockProjection` (owned by the `DeltaAdapterModel`).
        scale: this block's strength, set by `set_delta_adapter_scale`.
        call: the transformer's `DeltaCall`, which holds this forward's edit tokens.
    """

    def __init__(self, block_projection, scale: float = 1.0, call: DeltaCall | None = None):
        super().__init__(block_projection, scale)
        self.call = call if call is not None else DeltaCall()

    def __call__(
        self,
        attn: Flux3Attention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query, key, value = _get_qkv_projections(attn, hidden_states)  # (B, S, H * D) each
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)).float())  # (B, S, H, D)
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)).float())
        value = value.unflatten(-1, (attn.heads, -1))
        branch_query = query.to(value.dtype)  # edit tokens have no position: the query before RoPE
        # RoPE on the float32 queries and keys, then the cast to the values' dtype, as upstream's FLUX.3 does
        hidden_states = self._self_attention(query, key, value, image_rotary_emb, attention_mask)  # (B, S, H * D)

        strength = self._strength(self.call.tokens, self.call.scale)
        if strength != 0.0:
            hidden_states = hidden_states + self._branch(branch_query, self.call.tokens, strength)

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def block_counts(config) -> tuple[int, int]:
    """The adapter's (double, single) block counts for a FLUX.3 transformer config: the two image modes' early
    blocks, and the single blocks."""
    return 2 * config.num_layers, config.num_single_layers


def layout(num_layers: int):
    """Where each attention layer of a FLUX.3 transformer with `num_layers` early blocks per mode sits among the
    adapter's blocks (`delta_processors_for`'s layout): the noisy image's early blocks are double blocks 0..n-1, the
    reference's n..2n-1, the single blocks single ones; the text's early blocks have none."""

    def place(name: str) -> BlockPlace | None:
        parts = name.split(".")
        if parts[0] == "mode_blocks":  # mode_blocks.image.i / mode_blocks.image_cond.i
            return "double", int(parts[2]) + (num_layers if parts[1] == "image_cond" else 0)
        if parts[0] == "single_transformer_blocks":
            return "single", int(parts[1])
        if parts[0] == "txt_mode_blocks":
            return None  # the text's early blocks: upstream's processor
        raise ValueError(f"Unexpected attention layer {name} in a Flux3Transformer2DModel.")

    return place


def call_of(transformer: Flux3Transformer2DModel) -> DeltaCall:
    """The transformer's `DeltaCall`, created with its pre-hook on first use."""
    call = getattr(transformer, "_delta_call", None)
    if call is None:
        call = DeltaCall()
        call.handle = transformer.register_forward_pre_hook(call.take, with_kwargs=True)
        transformer._delta_call = call
    return call


def processors_for(transformer: Flux3Transformer2DModel, adapter: DeltaAdapterModel) -> dict[str, DeltaBranch]:
    """One Delta-Adapter processor per attention layer of the image modes' early blocks and the single blocks (the
    text's keep theirs), sharing the transformer's `DeltaCall`, whose pre-hook this installs once (`release` takes
    it off)."""
    call = call_of(transformer)
    processors = {"double": Flux3DeltaAttnProcessor, "single": Flux3DeltaAttnProcessor}
    return delta_processors_for(transformer, adapter, processors, layout(transformer.config.num_layers), call=call)


def release(transformer: Flux3Transformer2DModel) -> None:
    """Takes the edit-token pre-hook off the transformer (once its Delta-Adapter processors are gone)."""
    call = getattr(transformer, "_delta_call", None)
    if call is not None:
        call.handle.remove()
        del transformer._delta_call


def preprocess_query(pipe, rgb: PIL.Image.Image) -> torch.Tensor:
    """A query as FLUX.3's pipeline prepares its one reference image (`Flux3ImageProcessor`, `resize_mode="fill"`:
    kept whole, scaled down so that its canvas fits under 4 megapixels, reflect-padded to the token grid) ->
    (1, 3, H, W) in [-1, 1]."""
    return pipe.image_processor.preprocess(rgb, resize_mode="fill")[0]


@torch.no_grad()
def encode_prompt(
    pipe, prompt: str, max_sequence_length: int, text_encoder_out_layers: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """A prompt's conditioning with the pipeline's Qwen3-VL, as upstream's `Flux3TextEncoderStep` makes it:
    `prompt_embeds` (1, L, D_txt), L a multiple of 80 tokens."""
    prompt_embeds = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        prompt=prompt,
        device=pipe._execution_device,
        max_sequence_length=max_sequence_length,
        hidden_states_layers=text_encoder_out_layers,
    )
    return {"prompt_embeds": prompt_embeds}


def training_conditioning() -> dict[str, torch.Tensor]:
    """What the objective takes beside the prompt's embeddings: nothing (FLUX.3 has no guidance embedding)."""
    return {}


def predict_velocity(
    transformer: Flux3Transformer2DModel,
    noisy_latents: torch.Tensor,
    reference_latents: torch.Tensor,
    text_conditioning: dict[str, torch.Tensor],
    sigmas: torch.Tensor,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FLUX.3 prediction with a reference image, laid out as upstream's modular image-to-image pipeline lays it
    out (the reference as `image_cond_hidden_states` at position l = -1).

    Args:
        transformer: the FLUX.3 transformer; a flow-map (distilled) one is asked for the instantaneous velocity (its
            target timestep is the current one).
        noisy_latents: (B, 4C, h, w) x_t, normalised and patchified.
        reference_latents: (B, 4C, h, w) the reference (query) image's latents.
        text_conditioning: `prompt_embeds`, (1 or B, L, D_txt).
        sigmas: (B,) noise levels (FLUX.3's timestep in [0, 1]).
        joint_attention_kwargs: the edit (`delta_hidden_states`, `delta_scale`) and LoRA's `scale`, passed as the
            transformer's `attention_kwargs`.

    Returns:
        The velocity for the noisy tokens (B, hw, 4C) and the packed noisy latents (B, hw, 4C).
    """
    batch_size, _, height, width = noisy_latents.shape
    device, dtype = noisy_latents.device, transformer.dtype
    packed_noisy = pack_latents(noisy_latents)  # (B, hw, 4C)
    prompt_embeds = text_conditioning["prompt_embeds"].expand(batch_size, -1, -1).to(dtype)  # (B, L, D_txt)
    timestep = sigmas.to(device, dtype)
    velocity = transformer(
        hidden_states=packed_noisy.to(dtype),
        encoder_hidden_states=prompt_embeds,
        timestep=timestep,
        img_ids=_prepare_image_ids(height, width, IMAGE_ROPE_SCALE).to(device),
        txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(prompt_embeds).to(device),
        image_cond_hidden_states=pack_latents(reference_latents).to(dtype),
        image_cond_ids=_prepare_image_ids(height, width, IMAGE_ROPE_SCALE, l_coord=-1).to(device),
        target_timestep=timestep if transformer.config.flow_map else None,
        attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0]
    return velocity, packed_noisy
