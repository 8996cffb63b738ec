"""Argument checks shared by the pipeline, the loader and adaptation: each refuses bad input with a short error that
says what to pass, before anything is changed or computed."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


#: What every adapter method says when no adapter is loaded.
NO_ADAPTER = "No Delta-Adapter is loaded: call pipe.load_delta_adapter(...) first."


def finite_float(value, name: str, minimum: float | None = None) -> float:
    """`value` as a float, refused unless it is a finite real number (at least `minimum`, when given)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def positive_int(value, name: str) -> int:
    """`value` as an int, refused unless it is an integer of at least 1 (`True` and `"5"` are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)


def as_tensor(value, name: str, fix: str) -> torch.Tensor:
    """A torch tensor (numpy arrays are converted), refused unless every value is finite."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}: {fix}.")
    check_finite(value, name)
    return value


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Refuses a floating-point tensor holding NaN or infinity."""
    if non_finite_keys({name: tensor}):
        raise ValueError(f"{name} holds NaN or infinite values.")


def non_finite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [
        key
        for key, tensor in state_dict.items()
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()
    ]
