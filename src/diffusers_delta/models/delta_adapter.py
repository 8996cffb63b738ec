"""`DeltaAdapterModel`: every trainable weight of Delta-Adapter, in one config-carrying diffusers model.

semantic delta (B, P, D_enc)
  -> gated residual refiner        Δ + tanh(α)·(WΔ + b), α = 0 at init           (B, P, D_enc)
  -> Perceiver resampler           N learned queries attend to [Δ, queries]       (B, N, W)
  -> per-token projection          one affine map per query, one batched weight    (B, N, D_edit)  = edit tokens
  -> per-block K/V (used by the attention processors, one `DeltaBlockProjection` per FLUX.2 block)

The config records the target backbone (`"flux2"`: FLUX.2 [klein]/[dev]; `"flux1"`: FLUX.1 Kontext) and its
transformer's signature (inner dim, head dim, block counts), so an adapter refuses a backbone it was not made for
instead of failing deep inside a matmul, and loading never guesses a size from a shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class GatedResidualRefiner(nn.Module):
    """`Δ + tanh(α)·(WΔ + b)` with one scalar gate α initialised at 0, so the refiner starts as the identity.

    Args:
        dim: feature dimension of the semantic delta.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P, D)."""
        return delta + torch.tanh(self.gate) * self.proj(delta)


class PerceiverAttention(nn.Module):
    """Pre-norm cross-attention where the latents attend to `[features, latents]`.

    Args:
        dim: width of features and latents.
        heads: number of attention heads.
        head_dim: width of one head.
    """

    def __init__(self, *, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner_dim = heads * head_dim
        self.norm_features = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features (B, P, W), latents (B, N, W) -> update for the latents (B, N, W)."""
        features = self.norm_features(features)
        latents = self.norm_latents(latents)
        query = self.to_q(latents).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, N, d)
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        key = key.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, P + N, d)
        value = value.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, P + N, d)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, W)


class PerceiverFeedForward(nn.Sequential):
    """Pre-norm two-layer MLP with GELU."""

    def __init__(self, *, dim: int, mult: int):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class PerceiverResampler(nn.Module):
    """N learned queries that read a variable-length token sequence into a fixed-length one.

    Args:
        input_dim: width of the incoming tokens.
        dim: width of the latents.
        depth: number of attention + feed-forward layers.
        heads: attention heads per layer.
        head_dim: width of one head.
        num_latents: N, the number of output tokens.
        ff_mult: hidden-width multiplier of the feed-forward layers.
    """

    def __init__(
        self, *, input_dim: int, dim: int, depth: int, heads: int, head_dim: int, num_latents: int, ff_mult: int
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(input_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, heads=heads, head_dim=head_dim),
                    PerceiverFeedForward(dim=dim, mult=ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D_in) -> (B, N, W)."""
        features = self.proj_in(tokens)  # (B, P, W)
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, N, W)
        for attention, feed_forward in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(latents)


class PerTokenProjection(nn.Module):
    """An affine map of its own for each of N tokens, as one batched weight: `y_i = W_i x_i + b_i`.

    Args:
        num_tokens: N.
        input_dim: width of each incoming token.
        output_dim: width of each outgoing token.
    """

    def __init__(self, *, num_tokens: int, input_dim: int, output_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(input_dim)  # nn.Linear's default range, per token
        self.weight = nn.Parameter(torch.empty(num_tokens, input_dim, output_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tokens, output_dim).uniform_(-bound, bound))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D_in) -> (B, N, D_out)."""
        return torch.einsum("bni,nio->bno", tokens, self.weight) + self.bias


class PooledMLPProjection(nn.Module):
    """RelationAdapter's design, kept for the paper's ablation: average-pool the patch tokens, then an MLP writes all
    N edit tokens at once. Delta-Adapter replaces it with the Perceiver and per-token projection.

    Args:
        input_dim: width of the incoming tokens.
        hidden_dim: the MLP's hidden width.
        num_tokens: N.
        output_dim: width of each edit token.
    """

    def __init__(self, *, input_dim: int, hidden_dim: int, num_tokens: int, output_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * output_dim)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D_in) -> (B, N, D_out)."""
        return self.mlp(tokens.mean(dim=1)).unflatten(-1, (self.num_tokens, -1))


class DeltaBlockProjection(nn.Module):
    """The decoupled branch's weights for one FLUX.2 block: `to_k_delta`, `to_v_delta`, a key norm and the gate λ.

    `to_v_delta` starts at zero, so a fresh adapter adds exactly nothing and training starts from the base model.
    λ multiplies the values (the branch is linear in V), which keeps every weight inside a module's forward: this
    is what lets accelerate's offloading hooks place them.

    Args:
        edit_token_dim: width of the edit tokens.
        inner_dim: the block's attention width (heads × head_dim).
        head_dim: width of one attention head.
    """

    def __init__(self, *, edit_token_dim: int, inner_dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_k_delta = nn.Linear(edit_token_dim, inner_dim, bias=False)
        self.to_v_delta = nn.Linear(edit_token_dim, inner_dim, bias=False)
        nn.init.zeros_(self.to_v_delta.weight)
        # Queries in FLUX.2 are RMS-normalised per head; normalising the new keys the same way keeps the logits of
        # the branch on the scale of the block's own attention.
        self.norm_k_delta = nn.RMSNorm(head_dim, eps=1e-6)
        self.delta_gate = nn.Parameter(torch.ones(()))

    def forward(self, edit_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D_edit) -> key (B, N, heads, head_dim), λ-scaled value (B, N, heads, head_dim)."""
        key = self.norm_k_delta(self.to_k_delta(edit_tokens).unflatten(-1, (-1, self.head_dim)))
        value = self.delta_gate * self.to_v_delta(edit_tokens).unflatten(-1, (-1, self.head_dim))
        return key, value


class DeltaAdapterModel(ModelMixin, ConfigMixin):
    """Delta-Adapter: semantic delta -> edit tokens, plus the per-block K/V projections of the decoupled branch.

    Defaults fit FLUX.2 [klein] 4B with `google/siglip-so400m-patch14-384`; `backbones.adapter_for`
    builds the config for any `Flux2Transformer2DModel` or `FluxTransformer2DModel`.

    Args:
        image_embed_dim: D_enc, the width of the image encoder's patch tokens.
        num_edit_tokens: N, the number of edit tokens (Perceiver queries).
        resampler_dim: W, the Perceiver's width.
        resampler_depth: number of Perceiver layers.
        resampler_heads: attention heads in the Perceiver.
        resampler_head_dim: width of one Perceiver head.
        resampler_ff_mult: hidden-width multiplier of the Perceiver's feed-forward layers.
        edit_token_dim: D_edit, the width of the edit tokens.
        transformer_inner_dim: the target transformer's attention width (heads × head_dim).
        transformer_head_dim: the target transformer's head width.
        num_double_blocks: the target transformer's double-stream block count.
        num_single_blocks: the target transformer's single-stream block count.
        projection_type: `"perceiver"` (Delta-Adapter: Perceiver resampler + per-token projection) or
            `"pooled_mlp"` (RelationAdapter's pooled MLP, for the ablation; `resampler_dim` is its hidden width).
        backbone: the name of the backbone the adapter is made for (`backbones`): `"flux2"` (FLUX.2, the default,
            which configs written before FLUX.1 support imply), `"flux1"` (FLUX.1 Kontext) or `"flux3"` (FLUX.3).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 1152,
        num_edit_tokens: int = 32,
        resampler_dim: int = 1280,
        resampler_depth: int = 4,
        resampler_heads: int = 20,
        resampler_head_dim: int = 64,
        resampler_ff_mult: int = 4,
        edit_token_dim: int = 3072,
        transformer_inner_dim: int = 3072,
        transformer_head_dim: int = 128,
        num_double_blocks: int = 5,
        num_single_blocks: int = 20,
        projection_type: str = "perceiver",
        backbone: str = "flux2",
    ):
        super().__init__()
        if projection_type not in ("perceiver", "pooled_mlp"):
            raise ValueError(f"projection_type must be 'perceiver' or 'pooled_mlp', got {projection_type!r}.")
        if not isinstance(backbone, str) or not backbone:  # which names exist is `backbones`' business
            raise ValueError(f"backbone must be a backbone's name (such as 'flux2'), got {backbone!r}.")
        if transformer_inner_dim % transformer_head_dim:
            raise ValueError(
                f"transformer_inner_dim ({transformer_inner_dim}) must be a multiple of "
                f"transformer_head_dim ({transformer_head_dim})."
            )
        self.refiner = GatedResidualRefiner(image_embed_dim)
        if projection_type == "perceiver":
            self.resampler = PerceiverResampler(
                input_dim=image_embed_dim,
                dim=resampler_dim,
                depth=resampler_depth,
                heads=resampler_heads,
                head_dim=resampler_head_dim,
                num_latents=num_edit_tokens,
                ff_mult=resampler_ff_mult,
            )
            self.token_projection = PerTokenProjection(
                num_tokens=num_edit_tokens, input_dim=resampler_dim, output_dim=edit_token_dim
            )
        else:
            self.pooled_projection = PooledMLPProjection(
                input_dim=image_embed_dim,
                hidden_dim=resampler_dim,
                num_tokens=num_edit_tokens,
                output_dim=edit_token_dim,
            )

        def block_projection() -> DeltaBlockProjection:
            return DeltaBlockProjection(
                edit_token_dim=edit_token_dim, inner_dim=transformer_inner_dim, head_dim=transformer_head_dim
            )

        self.double_blocks = nn.ModuleList(block_projection() for _ in range(num_double_blocks))
        self.single_blocks = nn.ModuleList(block_projection() for _ in range(num_single_blocks))

    def forward(self, semantic_delta: torch.Tensor) -> torch.Tensor:
        """Semantic delta (B, P, D_enc) -> edit tokens (B, N, D_edit)."""
        refined = self.refiner(semantic_delta)  # (B, P, D_enc)
        if self.config.projection_type == "pooled_mlp":
            return self.pooled_projection(refined)  # (B, N, D_edit)
        resampled = self.resampler(refined)  # (B, N, W)
        return self.token_projection(resampled)  # (B, N, D_edit)
