"""`DeltaScaleMixin`: the strength of the decoupled branch, for every block or per block."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .attention_processor import DeltaBranch
from .checks import NO_ADAPTER, finite_float
from .concurrency import changes_the_adapter


class DeltaScaleMixin:
    """`delta_processors`, `get_delta_adapter_scale` and `set_delta_adapter_scale`. Part of `DeltaAdapterMixin`."""

    @property
    def delta_processors(self) -> dict:
        """The transformer's Delta-Adapter processors by layer name (empty when no adapter is loaded)."""
        return {
            name: processor
            for name, processor in self.transformer.attn_processors.items()
            if isinstance(processor, DeltaBranch)
        }

    def get_delta_adapter_scale(self) -> dict[str, list[float]]:
        """The strength of every block: `{"double": [...], "single": [...]}`, as `set_delta_adapter_scale` takes
        (each list in the order of the adapter's blocks; FLUX.3's "double" blocks are its image modes' early
        blocks)."""
        processors = self.delta_processors
        if not processors:
            raise RuntimeError(NO_ADAPTER)
        scales = {"double": {}, "single": {}}
        for processor in processors.values():
            kind, index = processor.block
            scales[kind][index] = processor.scale
        return {kind: [by_index[i] for i in sorted(by_index)] for kind, by_index in scales.items()}

    @changes_the_adapter
    def set_delta_adapter_scale(self, scale: float | dict[str, float | Sequence[float]]) -> None:
        """Sets the strength of the decoupled branch, for all blocks or per block. Everything is checked before any
        block changes. Negative values push away from the edit.

        Args:
            scale: one number for every block, or `{"double": ..., "single": ...}` where each value is one number
                for all blocks of that kind or a list of one number per block (a key left out keeps those blocks).
        """
        current = self.get_delta_adapter_scale()
        if isinstance(scale, dict):
            unknown = set(scale) - set(current)
            if unknown:
                raise ValueError(f"Scale keys must be 'double' and/or 'single', got {sorted(unknown)}.")
            requested = {**current, **scale}
        else:
            requested = dict.fromkeys(current, scale)
        scales = {}
        for kind, value in requested.items():
            count = len(current[kind])
            if isinstance(value, (list, tuple, np.ndarray)) or isinstance(value, torch.Tensor) and value.ndim == 1:
                values = list(value)
            elif isinstance(value, (numbers.Real, np.generic)) or isinstance(value, torch.Tensor) and value.ndim == 0:
                values = [value] * count  # one number for every block of this kind
            else:
                raise TypeError(
                    f"The {kind}-block scale must be a number or a list of {count} numbers, got "
                    f"{type(value).__name__} {value!r}."
                )
            if len(values) != count:
                raise ValueError(
                    f"{len(values)} {kind}-block scales given, but the transformer has {count} {kind}-stream blocks: "
                    "pass one scale per block, or one number for all of them."
                )
            scales[kind] = [finite_float(v, f"The {kind}-block scale") for v in values]
        for processor in self.delta_processors.values():
            kind, index = processor.block
            processor.scale = scales[kind][index]
