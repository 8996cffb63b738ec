"""Small, seeded instances of the real classes FLUX.2 [klein], FLUX.1 Kontext and Delta-Adapter are made of, built in
code.

No download and no imitation: these are `Flux2Transformer2DModel`, `AutoencoderKLFlux2`, `SiglipVisionModel`,
`Qwen3ForCausalLM` and a Qwen2 tokenizer (klein), `FluxTransformer2DModel`, `AutoencoderKL`, `CLIPTextModel`,
`T5EncoderModel` and their tokenizers (Kontext), and `Flux3Transformer2DModel` (FLUX.3) at toy sizes, so tests and
CPU benchmarks run the real code paths offline.
Two sizes exist: `TINY` (the test suite: milliseconds per call) and `SMALL` (CPU benchmarks: big enough that
attention and matmuls, not Python, dominate the time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    Flux3Transformer2DModel,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .backbones import adapter_for
from .models.delta_adapter import DeltaAdapterModel


@dataclass(frozen=True)
class ModelSizes:
    """The knobs that set the size of every component.

    Args:
        heads: transformer attention heads.
        head_dim: transformer head width (split evenly over the 4 RoPE axes).
        double_blocks: transformer double-stream blocks.
        single_blocks: transformer single-stream blocks.
        vae_channels: VAE block widths (3 levels: 4× downsampling).
        qwen_hidden: tiny Qwen3 width (the transformer's text width is 3× this: 3 stacked layers).
        siglip_hidden: SigLIP width.
        siglip_layers: SigLIP depth.
        siglip_image_size: SigLIP input side (patches of 8).
        edit_tokens: adapter edit tokens N.
        resampler_dim: adapter Perceiver width.
        image_size: side of the test images.
    """

    heads: int = 2
    head_dim: int = 16
    double_blocks: int = 1
    single_blocks: int = 2
    vae_channels: tuple[int, ...] = (8, 16, 16)
    qwen_hidden: int = 16
    siglip_hidden: int = 32
    siglip_layers: int = 2
    siglip_image_size: int = 32
    edit_tokens: int = 4
    resampler_dim: int = 16
    image_size: int = 64


TINY = ModelSizes()
SMALL = ModelSizes(
    heads=4,
    head_dim=64,
    double_blocks=2,
    single_blocks=4,
    vae_channels=(32, 64, 64),
    qwen_hidden=64,
    siglip_hidden=128,
    siglip_layers=4,
    siglip_image_size=128,
    edit_tokens=16,
    resampler_dim=128,
    image_size=256,
)

#: Keyword arguments every pipeline call on these models needs: the Qwen3 has 3 layers and short prompts.
TEXT_KWARGS = {"max_sequence_length": 16, "text_encoder_out_layers": (1, 2, 3)}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer over lowercase letters with Qwen's special tokens and chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    symbols = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ", "<", ">", "|", "_", "/"]
    vocab = {token: index for index, token in enumerate(specials + symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(vocab_size: int, sizes: ModelSizes = TINY) -> Qwen3ForCausalLM:
    """A seeded `Qwen3ForCausalLM` of the given vocabulary at `sizes`: klein's text encoder, small."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=sizes.qwen_hidden,
        intermediate_size=2 * sizes.qwen_hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=sizes.qwen_hidden // 2,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_qwen3_vl_components(sizes: ModelSizes = TINY) -> dict:
    """FLUX.3's text components, small: a seeded `Qwen3VLForConditionalGeneration` (3 layers of `sizes.qwen_hidden`,
    so that 3 stacked layers give the tiny FLUX.3 transformer's text width) as `text_encoder`, and a `Qwen3VLProcessor`
    around `tiny_tokenizer` as `tokenizer`. Transformers builds Qwen3-VL's processor only beside torchvision."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = tiny_tokenizer()
    head_dim = sizes.qwen_hidden // 2
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": sizes.qwen_hidden, "intermediate_size": 2 * sizes.qwen_hidden,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim,
            "rope_scaling": {"rope_type": "default", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
            "out_hidden_size": sizes.qwen_hidden, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "deepstack_visual_indexes": [0],
        },
    )  # fmt: skip
    torch.manual_seed(0)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen3VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return {"text_encoder": Qwen3VLForConditionalGeneration(config).eval(), "tokenizer": processor}


def tiny_transformer(sizes: ModelSizes = TINY) -> Flux2Transformer2DModel:
    """A FLUX.2 transformer over 4 latent channels patchified 2x2 (16 input channels)."""
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, timestep_guidance_channels=32, guidance_embeds=False, **_four_axis_transformer(sizes)
    ).eval()


def tiny_flux3_transformer(sizes: ModelSizes = TINY, flow_map: bool = False) -> Flux3Transformer2DModel:
    """A FLUX.3 transformer over `tiny_vae`'s 4 latent channels patchified 2x2 (16 input channels), with
    `sizes.double_blocks` early blocks per mode; `flow_map` for the distilled variant."""
    torch.manual_seed(0)
    return Flux3Transformer2DModel(
        cond_in_channels=16, timestep_channels=32, flow_map=flow_map, **_four_axis_transformer(sizes)
    ).eval()


def _four_axis_transformer(sizes: ModelSizes) -> dict:
    """What the tiny FLUX.2 and FLUX.3 transformers share: 16 input channels (4 latent channels patchified 2x2),
    `sizes`' blocks and heads, klein's text width, and four-axis RoPE."""
    axis = sizes.head_dim // 4
    return {
        "in_channels": 16,
        "num_layers": sizes.double_blocks,
        "num_single_layers": sizes.single_blocks,
        "attention_head_dim": sizes.head_dim,
        "num_attention_heads": sizes.heads,
        "joint_attention_dim": 3 * sizes.qwen_hidden,
        "mlp_ratio": 2.0,
        "axes_dims_rope": (axis, axis, axis, axis),
    }


def tiny_vae(sizes: ModelSizes = TINY) -> AutoencoderKLFlux2:
    """4x downsampling, 4 latent channels: a 64x64 image becomes 8x8 = 64 transformer tokens."""
    torch.manual_seed(0)
    return AutoencoderKLFlux2(**_vae_blocks(sizes)).eval()


def _vae_blocks(sizes: ModelSizes) -> dict:
    """The block layout both tiny VAEs share: `sizes.vae_channels` levels, 4 latent channels."""
    levels = len(sizes.vae_channels)
    return {
        "block_out_channels": sizes.vae_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": sizes.image_size,
    }


def tiny_image_encoder(sizes: ModelSizes = TINY) -> SiglipVisionModel:
    """SigLIP with 8x8 patches (TINY: 32x32 input, 16 patch tokens of 32 features)."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=sizes.siglip_hidden,
        intermediate_size=2 * sizes.siglip_hidden,
        num_hidden_layers=sizes.siglip_layers,
        num_attention_heads=2,
        image_size=sizes.siglip_image_size,
        patch_size=8,
    )
    return SiglipVisionModel(config).eval()


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2 [klein]'s scheduler settings."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )


def tiny_adapter(transformer: Flux2Transformer2DModel, sizes: ModelSizes = TINY, seed: int = 0) -> DeltaAdapterModel:
    """A freshly initialised adapter for `transformer` (its output leaves the base model unchanged)."""
    torch.manual_seed(seed)
    return adapter_for(
        transformer,
        image_embed_dim=sizes.siglip_hidden,
        num_edit_tokens=sizes.edit_tokens,
        resampler_dim=sizes.resampler_dim,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=sizes.resampler_dim // 2,
        resampler_ff_mult=2,
    ).eval()


def randomize_(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Gives every parameter random non-zero values, as a trained adapter would have (scalars around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(noise + (1.0 if parameter.ndim == 0 else 0.0))
    return model


def tiny_klein_components(sizes: ModelSizes = TINY) -> dict:
    """The keyword arguments of `Flux2KleinPipeline` (and `FluxDeltaEditPipeline`), distilled like klein-4B."""
    tokenizer = tiny_tokenizer()
    return {
        "scheduler": tiny_scheduler(),
        "vae": tiny_vae(sizes),
        "text_encoder": tiny_text_encoder(len(tokenizer), sizes),
        "tokenizer": tokenizer,
        "transformer": tiny_transformer(sizes),
        "is_distilled": True,
    }


def tiny_klein_pipeline(sizes: ModelSizes = TINY) -> Flux2KleinPipeline:
    """A seeded `Flux2KleinPipeline` of tiny real components (`tiny_klein_components`), progress bars off."""
    pipe = Flux2KleinPipeline(**tiny_klein_components(sizes))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    """A random RGB image of (width, height) = size."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ FLUX.1 Kontext

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
#: Keyword arguments every Kontext call on these models needs: a short T5 prompt.
KONTEXT_TEXT_KWARGS = {"max_sequence_length": 16}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A BPE tokenizer over lowercase letters with CLIP's special tokens and 77-token prompts."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(specials + LETTERS + [f"{c}</w>" for c in LETTERS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[1], end_of_word_suffix="</w>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return CLIPTokenizer(
        tokenizer_object=backend,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        unk_token=specials[1],
        model_max_length=77,
    )


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A unigram tokenizer over lowercase letters with T5's special tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in LETTERS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def tiny_clip_text_encoder(vocab_size: int, sizes: ModelSizes = TINY) -> CLIPTextModel:
    """A seeded `CLIPTextModel` of the given vocabulary at `sizes`: Kontext's pooled-prompt encoder, small."""
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.qwen_hidden,
        intermediate_size=2 * sizes.qwen_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=sizes.qwen_hidden,
        bos_token_id=0,  # tiny_clip_tokenizer's <|startoftext|> and <|endoftext|>
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_t5_text_encoder(vocab_size: int, sizes: ModelSizes = TINY) -> T5EncoderModel:
    """A seeded `T5EncoderModel` of the given vocabulary at `sizes`: Kontext's prompt encoder, small."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=3 * sizes.qwen_hidden,
        d_kv=sizes.qwen_hidden,
        d_ff=2 * sizes.qwen_hidden,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def tiny_flux_transformer(sizes: ModelSizes = TINY) -> FluxTransformer2DModel:
    """A FLUX.1 transformer over 4 latent channels packed 2x2 (16 input channels), guidance-distilled as Kontext
    [dev] is."""
    torch.manual_seed(0)
    axis = sizes.head_dim // 8
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=sizes.double_blocks,
        num_single_layers=sizes.single_blocks,
        attention_head_dim=sizes.head_dim,
        num_attention_heads=sizes.heads,
        joint_attention_dim=3 * sizes.qwen_hidden,
        pooled_projection_dim=sizes.qwen_hidden,
        guidance_embeds=True,
        axes_dims_rope=(2 * axis, 3 * axis, 3 * axis),
    ).eval()


def tiny_flux_vae(sizes: ModelSizes = TINY) -> AutoencoderKL:
    """4x downsampling, 4 latent channels, FLUX.1's shift and scale: a 64x64 image becomes 8x8 = 64 tokens."""
    torch.manual_seed(0)
    return AutoencoderKL(
        **_vae_blocks(sizes),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def tiny_kontext_components(sizes: ModelSizes = TINY) -> dict:
    """The keyword arguments of `FluxKontextPipeline` (and `FluxKontextDeltaEditPipeline`)."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        "vae": tiny_flux_vae(sizes),
        "text_encoder": tiny_clip_text_encoder(len(tokenizer), sizes),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_text_encoder(len(tokenizer_2), sizes),
        "tokenizer_2": tokenizer_2,
        "transformer": tiny_flux_transformer(sizes),
    }


def tiny_delta_pipeline(sizes: ModelSizes = TINY, adapter_std: float | None = None, backbone: str = "flux2"):
    """A Delta-Adapter pipeline with its text encoders, a SigLIP encoder and an adapter loaded: a fresh one (which
    leaves the base output unchanged), or with `adapter_std`, a trained-like one of random non-zero weights.

    Args:
        sizes: the models' sizes.
        adapter_std: the spread of a trained-like adapter's random weights (None: a fresh adapter).
        backbone: `"flux2"` (a `FluxDeltaEditPipeline` on klein) or `"flux1"` (a `FluxKontextDeltaEditPipeline` on
            Kontext, for `sizes.image_size` images, with the empty prompt's embeddings stored).
    """
    from .pipelines import FluxDeltaEditPipeline, FluxKontextDeltaEditPipeline

    if backbone == "flux1":
        pipe = FluxKontextDeltaEditPipeline(**tiny_kontext_components(sizes), image_size=sizes.image_size)
        pipe.encode_empty_prompt(**KONTEXT_TEXT_KWARGS)
    else:
        pipe = FluxDeltaEditPipeline(**tiny_klein_components(sizes))
    pipe.register_modules(image_encoder=tiny_image_encoder(sizes))
    adapter = tiny_adapter(pipe.transformer, sizes)
    if adapter_std is not None:
        randomize_(adapter, std=adapter_std)
    pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_toy_model(root, sizes: ModelSizes = TINY) -> None:
    """Writes a model folder laid out like the embedded toy model, from tiny models: `root/base` (a text-free
    pipeline that knows `sizes.image_size` only) and `root/adapter` (a trained-like adapter, its SigLIP and the empty
    prompt's embeddings), which `toyworld.load_pipeline(root)` loads.

    Args:
        root: the folder to write.
        sizes: the models' sizes (`TINY` for tests, `SMALL` for CPU benchmarks).
    """
    from pathlib import Path

    from .pipelines import FluxDeltaEditPipeline
    from .pipelines.pipeline_flux_delta_edit import compute_empty_prompt_embeds

    root = Path(root)
    pipe = tiny_delta_pipeline(sizes, adapter_std=0.05)
    pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    pipe.save_delta_adapter(root / "adapter")
    FluxDeltaEditPipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None, transformer=pipe.transformer,
        is_distilled=True, image_size=sizes.image_size,
    ).save_pretrained(root / "base")  # fmt: skip


def free_port() -> int:
    """A localhost port nobody listens on now, for a test's server or a distributed run's rendezvous, so that
    back-to-back runs never wait on each other."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
