"""Attention processors that add Delta-Adapter's decoupled cross-attention branch to FLUX.2 blocks.

Each processor performs the upstream FLUX.2 computation unchanged and adds

    λ · scale · softmax(Q · K_Δᵀ / √d) · V_Δ

to the attention output before the output projection, where Q is the block's own query after `norm_q` and before
RoPE (edit tokens have no position) and K_Δ, V_Δ come from the edit tokens through the block's
`DeltaBlockProjection` (which owns λ). Edit tokens arrive as the named kwarg `delta_hidden_states` through the
transformer's `joint_attention_kwargs`, with an optional per-call strength `delta_scale` (`scale` is taken by LoRA).
With no edit tokens, or a strength of 0, the output is exactly upstream's.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2ParallelSelfAttention,
    _get_qkv_projections,
)

from .models.delta_adapter import DeltaAdapterModel, DeltaBlockProjection


class _DeltaBranch:
    """What both processors share: the block's projection, its scale, and the branch computation."""

    # Read by diffusers' `set_attention_backend` and context-parallel machinery, as on upstream processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, block_projection: DeltaBlockProjection, scale: float = 1.0):
        self.block_projection = block_projection
        self.scale = float(scale)

    def _strength(self, delta_hidden_states: torch.Tensor | None, delta_scale: float | None) -> float:
        if delta_hidden_states is None:
            return 0.0
        return self.scale * (1.0 if delta_scale is None else float(delta_scale))

    @staticmethod
    def _heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """(B, S, H * D) each -> (B, S, H, D) each, with the block's own query and key norms."""
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        return query, key, value.unflatten(-1, (-1, attn.head_dim))

    def _self_attention(self, query, key, value, image_rotary_emb, attention_mask) -> torch.Tensor:
        """Upstream's attention with RoPE: (B, S, H, D) each -> (B, S, H * D)."""
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return out.flatten(2, 3).to(query.dtype)

    def _branch(self, query: torch.Tensor, delta_hidden_states: torch.Tensor, strength: float) -> torch.Tensor:
        """query (B, S, H, D) after norm_q, edit tokens (B, N, D_edit) -> branch output (B, S, H * D)."""
        key, value = self.block_projection(delta_hidden_states)  # (B, N, H, D) each
        # The strength scales the N values rather than the S outputs: the same result, far fewer multiplications.
        value = strength * value
        # The edit tokens are whole on every rank, so the branch is a local attention even under context
        # parallelism: the parallel config is deliberately not passed.
        out = dispatch_attention_fn(
            query, key.to(query.dtype), value.to(query.dtype), backend=self._attention_backend
        )  # (B, S, H, D)
        return out.flatten(2, 3).to(query.dtype)


class Flux2DeltaAttnProcessor(_DeltaBranch):
    """Processor for the double-stream `Flux2Attention`: the image stream's queries read the edit tokens.

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
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = self._heads(attn, query, key, value)  # (B, S_img, H, D) each
        image_query = query  # before RoPE and before the text tokens are joined

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))  # (B, S_txt, H, D)
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # (B, S_txt + S_img, H, D)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        hidden_states = self._self_attention(query, key, value, image_rotary_emb, attention_mask)  # (B, S, H * D)

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


class Flux2DeltaParallelSelfAttnProcessor(_DeltaBranch):
    """Processor for the single-stream `Flux2ParallelSelfAttention`: every token of the joint sequence reads the
    edit tokens, and the branch joins the attention half before the fused output projection.

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
    ) -> torch.Tensor:
        projected = attn.to_qkv_mlp_proj(hidden_states)  # (B, S, 3 * inner + mlp)
        # Split by the global QKV:MLP ratio, as upstream does, so column-sharded (tensor-parallel) weights work too.
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)

        query, key, value = self._heads(attn, *qkv.chunk(3, dim=-1))  # (B, S, H, D) each
        attn_output = self._self_attention(query, key, value, image_rotary_emb, attention_mask)  # (B, S, H * D)

        strength = self._strength(delta_hidden_states, delta_scale)
        if strength != 0.0:
            attn_output = attn_output + self._branch(query, delta_hidden_states, strength)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([attn_output, mlp_hidden_states], dim=-1))


def delta_processors_for(transformer, adapter: DeltaAdapterModel) -> dict[str, _DeltaBranch]:
    """One Delta-Adapter processor per attention layer of a FLUX.2 transformer, keeping each layer's backend.

    Args:
        transformer: the `Flux2Transformer2DModel` whose attention layers get the processors.
        adapter: the `DeltaAdapterModel` whose per-block projections they use.

    Returns:
        A dict for `transformer.set_attn_processor`.
    """
    processors = {}
    for name, original in transformer.attn_processors.items():
        block_type, index = name.split(".")[:2]
        if block_type == "transformer_blocks":
            processor = Flux2DeltaAttnProcessor(adapter.double_blocks[int(index)])
        elif block_type == "single_transformer_blocks":
            processor = Flux2DeltaParallelSelfAttnProcessor(adapter.single_blocks[int(index)])
        else:
            raise ValueError(f"Unexpected attention layer {name} in a FLUX.2 transformer.")
        # Keep any attention backend or parallel config the user chose for the layer.
        processor._attention_backend = original._attention_backend
        processor._parallel_config = original._parallel_config
        processors[name] = processor
    return processors
