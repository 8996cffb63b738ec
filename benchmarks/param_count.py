#!/usr/bin/env python
"""Delta-Adapter parameter counts at real size: FLUX.2 [klein] 4B and 9B, FLUX.1 Kontext [dev] and FLUX.3.

Everything is built on the `meta` device: real modules, no memory. Three tables:

1. klein's adapter by part. The projection (refiner + Perceiver + per-token projection) is set beside
   RelationAdapter's pooling-MLP, about 1.2 B parameters as the Delta-Adapter paper reports it (section 4.3: "half
   the parameters of the pooling-MLP projection").
2. Every backbone's adapter per edit-token width (`--edit_token_dim` of the training script): parameters, the
   training state of its float32 weights, gradients and Adam's two moments, and the per-block key/value maps' share.
3. The paper's "half" read as the paper says it, an equality: the projection's size for each edit-token count and
   width, and the pair nearest 0.6 B. The defaults (32 tokens, the transformer's width) stay until a comparison
   run on real data chooses.

    python benchmarks/param_count.py
"""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel, Flux3Transformer2DModel, FluxTransformer2DModel

from diffusers_delta.backbones import adapter_for


SIGLIP_SO400M_HIDDEN = 1152  # google/siglip-so400m-patch14-384
RELATION_ADAPTER_POOLING_MLP = 1.2e9  # quoted from the paper, not measured here

# From diffusers' FLUX.2 [klein] conversion settings (SPEC.md, section 4).
KLEIN_CONFIGS = {
    "klein-4B": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680},
    "klein-9B": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288},
}
# black-forest-labs/FLUX.1-Kontext-dev: its transformer/config.json.
KONTEXT_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
WIDTHS = (3072, 1536, 768, 384)
TOKEN_COUNTS = (16, 32, 64, 128)


def transformers_on_meta() -> dict[str, torch.nn.Module]:
    """Every backbone's real-size transformer, on the meta device (FLUX.3: diffusers' defaults, its published
    config)."""
    with torch.device("meta"):
        built = {
            name: Flux2Transformer2DModel(attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32), **overrides)
            for name, overrides in KLEIN_CONFIGS.items()
        }
        built["kontext-dev"] = FluxTransformer2DModel(**KONTEXT_TRANSFORMER)
        built["flux3"] = Flux3Transformer2DModel()
    return built


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def main() -> None:
    header = f"{'backbone':<9} {'transformer':>12} {'refiner':>9} {'perceiver':>10} {'per-token':>10} "
    header += f"{'projection':>11} {'K/V+λ blocks':>13} {'adapter':>9} {'proj/RA-MLP':>12}"
    print(header)
    for name, overrides in KLEIN_CONFIGS.items():
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel(attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32), **overrides)
            adapter = adapter_for(transformer, image_embed_dim=SIGLIP_SO400M_HIDDEN)
        refiner, perceiver, per_token = (
            count(adapter.refiner),
            count(adapter.resampler),
            count(adapter.token_projection),
        )
        projection = refiner + perceiver + per_token
        blocks = count(adapter.double_blocks) + count(adapter.single_blocks)
        ratio = projection / RELATION_ADAPTER_POOLING_MLP
        millions = [value / 1e6 for value in (refiner, perceiver, per_token, projection, blocks, count(adapter))]
        widths = (8, 9, 9, 10, 12, 8)
        columns = " ".join(f"{value:>{width}.1f}M" for value, width in zip(millions, widths))
        print(f"{name:<9} {count(transformer) / 1e9:>11.2f}B {columns} {ratio:>12.3f}")
        assert projection <= 0.5 * RELATION_ADAPTER_POOLING_MLP, f"{name}: projection above half of RelationAdapter's"
    print(
        f"goal: projection <= 0.5 x RelationAdapter's pooling-MLP ({RELATION_ADAPTER_POOLING_MLP / 1e9:.1f} B, quoted)"
    )
    transformers = transformers_on_meta()
    print()
    print(f"{'backbone':<12} {'edit width':>10} {'adapter':>9} {'K/V maps':>9} {'training state':>15}")
    for name, transformer in transformers.items():
        for width in sorted({adapter_for_default_width(transformer), *WIDTHS}, reverse=True):
            with torch.device("meta"):
                adapter = adapter_for(transformer, SIGLIP_SO400M_HIDDEN, edit_token_dim=width)
            total, blocks = count(adapter), count(adapter.double_blocks) + count(adapter.single_blocks)
            default = " (default)" if width == adapter_for_default_width(transformer) else ""
            print(f"{name:<12} {width:>10} {total / 1e9:>8.2f}B {100 * blocks / total:>8.0f}% "
                  f"{16 * total / 1e9:>12.1f} GB{default}")  # fmt: skip
    print("training state: float32 weights, gradients and Adam's two moments (16 bytes a parameter)")
    print()
    half = RELATION_ADAPTER_POOLING_MLP / 2
    print(f"klein-4B projection (refiner + Perceiver + per-token) by edit tokens x width; the paper's 'half': "
          f"{half / 1e9:.1f} B")  # fmt: skip
    print(f"{'tokens':>7} " + " ".join(f"{width:>9}" for width in WIDTHS))
    nearest = None
    for tokens in TOKEN_COUNTS:
        row = []
        for width in WIDTHS:
            with torch.device("meta"):
                adapter = adapter_for(
                    transformers["klein-4B"], SIGLIP_SO400M_HIDDEN, edit_token_dim=width, num_edit_tokens=tokens
                )
            projection = count(adapter.refiner) + count(adapter.resampler) + count(adapter.token_projection)
            row.append(f"{projection / 1e9:>8.3f}B")
            if nearest is None or abs(projection - half) < abs(nearest[0] - half):
                nearest = (projection, tokens, width)
        print(f"{tokens:>7} " + " ".join(row))
    print(f"nearest to {half / 1e9:.1f} B: {nearest[1]} tokens of width {nearest[2]} ({nearest[0] / 1e9:.3f} B)")


def adapter_for_default_width(transformer) -> int:
    """The edit-token width a new adapter gets by default: the transformer's inner width."""
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


if __name__ == "__main__":
    main()
