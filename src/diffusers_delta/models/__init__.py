"""The Delta-Adapter model: the semantic delta -> edit tokens -> each block's keys and values."""

from .delta_adapter import DeltaAdapterModel, DeltaBlockProjection


__all__ = ["DeltaAdapterModel", "DeltaBlockProjection"]
