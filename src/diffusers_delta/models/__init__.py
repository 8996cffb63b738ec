from .delta_adapter import DeltaAdapterModel, DeltaBlockProjection


__all__ = ["DeltaAdapterModel", "DeltaBlockProjection"]
