"""What every Delta-Adapter attention processor shares, whatever the backbone: the decoupled cross-attention branch.

Each backbone's processors (`backbones.flux2`, `backbones.flux1`) perform their upstream computation unchanged and
add

    λ · scale · softmax(Q · K_Δᵀ / √d) · V_Δ

to the attention output before the output projection, where Q is the block's own query after `norm_q` and before
RoPE (edit tokens have no position) and K_Δ, V_Δ come from the edit tokens through the block's
`DeltaBlockProjection` (which owns λ). Edit tokens arrive as the named kwarg `delta_hidden_states` through the
transformer's `joint_attention_kwargs`, with an optional per-call strength `delta_scale` (`scale` is taken by LoRA).
With no edit tokens, or a strength of 0, the output is exactly upstream's.

The edit tokens do not change across a call's denoising steps, so each processor keeps the K_Δ, V_Δ of the last
tokens it saw (`EditKeyValues`) and projects them again only for new tokens or changed weights: one projection per
block per edit instead of one per step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .models.delta_adapter import DeltaAdapterModel, DeltaBlockProjection


#: Upstream's attention over a joint sequence after RoPE, (B, S, H, D) each -> (B, S, H, D): a backbone's variant
#: (FLUX.2's KV-cached reference tokens) in place of plain attention.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class EditKeyValues(NamedTuple):
    """A block's K_Δ, V_Δ for one set of edit tokens, with what they were computed from: valid while the tokens and
    the block's weights are the very tensors they were, unchanged in place (each tensor's version counter) and in
    the same memory (a move to another device or dtype, even through `.data`, changes it)."""

    sources: tuple[tuple[weakref.ref, int, int], ...]
    key: torch.Tensor
    value: torch.Tensor

    @staticmethod
    def sources_of(edit_tokens: torch.Tensor, block_projection: DeltaBlockProjection) -> list[torch.Tensor]:
        """What a block's K_Δ, V_Δ are computed from: the edit tokens and the block's weights."""
        return [edit_tokens, *block_projection.parameters()]

    def fits(self, sources: list[torch.Tensor]) -> bool:
        """Whether these K/V were computed from exactly `sources`, none of them changed since."""
        return len(sources) == len(self.sources) and all(
            ref() is tensor and version == tensor._version and pointer == tensor.data_ptr()
            for (ref, version, pointer), tensor in zip(self.sources, sources)
        )


class DeltaBranch:
    """The base of every Delta-Adapter processor: the block's projection, its scale, and the branch computation."""

    # Read by diffusers' `set_attention_backend` and context-parallel machinery, as on upstream processors.
    _attention_backend = None
    _parallel_config = None

    #: Where the processor sits among the adapter's blocks, `(kind, index)` (set by `delta_processors_for`).
    block: tuple[str, int] | None = None

    def __init__(self, block_projection: DeltaBlockProjection, scale: float = 1.0):
        self.block_projection = block_projection
        self.scale = float(scale)
        self._edit_key_values: EditKeyValues | None = None

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

    def _self_attention(
        self, query, key, value, image_rotary_emb, attention_mask, attend: Attend | None = None
    ) -> torch.Tensor:
        """Upstream's attention with RoPE: (B, S, H, D) each -> (B, S, H * D). Queries and keys are cast to the
        values' dtype after RoPE: FLUX.3 normalises them in float32 (on FLUX.1 and FLUX.2 they already agree).
        `attend`, when given, replaces the plain attention after RoPE (FLUX.2's KV-cached reference tokens)."""
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key = query.to(value.dtype), key.to(value.dtype)
        if attend is not None:
            out = attend(query, key, value)
        else:
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        return out.flatten(2, 3).to(query.dtype)

    def _joint_attention(self, attn, projections, image_rotary_emb, attention_mask, attend: Attend | None = None):
        """Upstream's attention of a FLUX block (FLUX.1's `FluxAttention` or FLUX.2's `Flux2Attention`) from its
        Q/K/V projections `(query, key, value, encoder_query, encoder_key, encoder_value)`: the text stream's joined
        in front when the block has one.

        Returns:
            The attention output (B, S, H * D) over [text, image] (double-stream) or the joint sequence
            (single-stream), and the queries that read the edit tokens: the image stream's (or every token's), after
            `norm_q` and before RoPE (edit tokens have no position), (B, S_img, H, D).
        """
        query, key, value, encoder_query, encoder_key, encoder_value = projections
        query, key, value = self._heads(attn, query, key, value)  # (B, S_img, H, D) each
        branch_query = query
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))  # (B, S_txt, H, D)
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # (B, S_txt + S_img, H, D)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        return self._self_attention(query, key, value, image_rotary_emb, attention_mask, attend), branch_query

    def _edit_keys_and_values(self, delta_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K_Δ, V_Δ (B, N, H, D) each of edit tokens (B, N, D_edit): the stored ones while the tokens and this
        block's weights are unchanged, else projected anew (and stored, outside autograd and compilation)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.block_projection(delta_hidden_states)
        sources = EditKeyValues.sources_of(delta_hidden_states, self.block_projection)
        if any(tensor.is_inference() for tensor in sources):  # no version counters to tell a change by
            return self.block_projection(delta_hidden_states)
        stored = self._edit_key_values  # read once: a processor shared between threads may store others meanwhile
        if stored is not None and stored.fits(sources):
            return stored.key, stored.value
        key, value = self.block_projection(delta_hidden_states)
        refs = tuple((weakref.ref(tensor), tensor._version, tensor.data_ptr()) for tensor in sources)
        self._edit_key_values = EditKeyValues(refs, key, value)
        return key, value

    def _branch(self, query: torch.Tensor, delta_hidden_states: torch.Tensor, strength: float) -> torch.Tensor:
        """query (B, S, H, D) after norm_q, edit tokens (B, N, D_edit) -> branch output (B, S, H * D)."""
        key, value = self._edit_keys_and_values(delta_hidden_states)  # (B, N, H, D) each
        # The strength scales the N values rather than the S outputs: the same result, far fewer multiplications.
        value = strength * value
        # The edit tokens are whole on every rank, so the branch is a local attention even under context
        # parallelism: the parallel config is deliberately not passed.
        out = dispatch_attention_fn(
            query, key.to(query.dtype), value.to(query.dtype), backend=self._attention_backend
        )  # (B, S, H, D)
        return out.flatten(2, 3).to(query.dtype)


#: Where a processor sits: ("double", index) or ("single", index) in the adapter's per-block projections.
BlockPlace = tuple[str, int]


def standard_layout(name: str) -> BlockPlace:
    """FLUX.1's and FLUX.2's attention layers: `transformer_blocks.i` is double block i, `single_transformer_blocks.i`
    single block i.

    Raises:
        ValueError: a layer of another name.
    """
    block_type, index = name.split(".")[:2]
    if block_type == "transformer_blocks":
        return "double", int(index)
    if block_type == "single_transformer_blocks":
        return "single", int(index)
    raise ValueError(f"Unexpected attention layer {name} in a FLUX transformer.")


def delta_processors_for(
    transformer,
    adapter: DeltaAdapterModel,
    processor_classes: dict[str, type[DeltaBranch]],
    layout: Callable[[str], BlockPlace | None] = standard_layout,
    **processor_kwargs,
) -> dict[str, DeltaBranch]:
    """One Delta-Adapter processor per attention layer the branch runs in, keeping each layer's backend; the layers
    it does not run in keep their processors.

    Args:
        transformer: the transformer whose attention layers get the processors.
        adapter: the `DeltaAdapterModel` whose per-block projections they use.
        processor_classes: the backbone's processor class for each kind of block (`"double"`, `"single"`).
        layout: where each layer sits, `(kind, index)` among the adapter's blocks, or None where the branch does not
            run (default `standard_layout`, FLUX.1's and FLUX.2's).
        processor_kwargs: passed to every processor (a backbone's shared call state, for one).

    Returns:
        A dict for `transformer.set_attn_processor`; each Delta-Adapter processor records its `block` place.
    """
    processors = {}
    for name, original in transformer.attn_processors.items():
        place = layout(name)
        if place is None:
            processors[name] = original
            continue
        kind, index = place
        projections = adapter.double_blocks if kind == "double" else adapter.single_blocks
        processor = processor_classes[kind](projections[index], **processor_kwargs)
        processor.block = place
        # Keep any attention backend or parallel config the user chose for the layer.
        processor._attention_backend = original._attention_backend
        processor._parallel_config = original._parallel_config
        processors[name] = processor
    return processors
