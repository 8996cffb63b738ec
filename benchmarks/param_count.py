#!/usr/bin/env python
"""Delta-Adapter parameter counts for the real FLUX.2 [klein] 4B and 9B configurations.

Everything is built on the `meta` device: real modules, no memory. The projection (refiner + Perceiver +
per-token projection) is set beside RelationAdapter's pooling-MLP, about 1.2 B parameters as the Delta-Adapter
paper reports it (section 4.3: "half the parameters of the pooling-MLP projection"); the goal is at most half.

    python benchmarks/param_count.py
"""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

from diffusers_delta.backbones import adapter_for


SIGLIP_SO400M_HIDDEN = 1152  # google/siglip-so400m-patch14-384
RELATION_ADAPTER_POOLING_MLP = 1.2e9  # quoted from the paper, not measured here

# From diffusers' FLUX.2 [klein] conversion settings (SPEC.md, section 4).
KLEIN_CONFIGS = {
    "klein-4B": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680},
    "klein-9B": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288},
}


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


if __name__ == "__main__":
    main()
