"""Moving and copying a model's weights: casts that diffusers would warn about avoided, copies kept on the CPU."""

from __future__ import annotations

import torch


def cast_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None) -> None:
    """Moves a model, casting only when the dtype differs (diffusers warns on every cast through `to()`)."""
    cast = {} if model.dtype == dtype else {"dtype": dtype}
    if device is not None or cast:
        if cast and not getattr(model, "_keep_in_fp32_modules", None):
            # diffusers' `to()` warns of modules to keep in float32 on every cast, even when there are none
            torch.nn.Module.to(model, device=device, **cast)
        else:
            model.to(device=device, **cast)


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a model's weights on the CPU, for restoring them bit-for-bit (never on the accelerator, where a
    klein-size adapter's copy would take over a gigabyte)."""
    return {
        name: tensor.detach().clone() if tensor.is_meta else tensor.detach().to("cpu", copy=True)  # meta: no data
        for name, tensor in model.state_dict().items()
    }
