"""Tiny, seeded instances of the real classes FLUX.2 [klein] and Delta-Adapter are made of, built in code.

No download, no imitation: these are `Flux2Transformer2DModel`, `AutoencoderKLFlux2`, `SiglipVisionModel`,
`Qwen3ForCausalLM` and a Qwen2 tokenizer at toy sizes, so every test runs the real code paths on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from diffusers_delta import DeltaAdapterModel


#: Keyword arguments every tiny pipeline call needs: the tiny Qwen3 has 3 layers and short prompts.
TEXT_KWARGS = {"max_sequence_length": 16, "text_encoder_out_layers": (1, 2, 3)}
QWEN_HIDDEN = 16
SIGLIP_HIDDEN = 32

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


def tiny_text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_transformer() -> Flux2Transformer2DModel:
    """1 double + 2 single blocks, 2 heads of 16, input 16 channels (4 latent channels, patchified 2x2)."""
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * QWEN_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()


def tiny_vae() -> AutoencoderKLFlux2:
    """4x downsampling, 4 latent channels: a 64x64 image becomes 8x8 = 64 transformer tokens."""
    torch.manual_seed(0)
    return AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def tiny_image_encoder() -> SiglipVisionModel:
    """SigLIP at 32x32 input with 8x8 patches: 16 patch tokens of 32 features."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=SIGLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return SiglipVisionModel(config).eval()


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )


def tiny_adapter(transformer: Flux2Transformer2DModel, seed: int = 0) -> DeltaAdapterModel:
    """A freshly initialised tiny adapter (its output leaves the base model unchanged)."""
    torch.manual_seed(seed)
    return DeltaAdapterModel.from_transformer(
        transformer,
        image_embed_dim=SIGLIP_HIDDEN,
        num_edit_tokens=4,
        resampler_dim=16,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=8,
        resampler_ff_mult=2,
    ).eval()


def randomize_(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Gives every parameter random non-zero values, as a trained adapter would have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std + (1.0 if parameter.ndim == 0 else 0.0))
    return model


def tiny_klein_components() -> dict:
    tokenizer = tiny_tokenizer()
    return {
        "scheduler": tiny_scheduler(),
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(len(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": tiny_transformer(),
        "is_distilled": True,
    }


def tiny_klein_pipeline() -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    """A random RGB image (width, height) = size."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))

