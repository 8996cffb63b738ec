"""Turning user images (PIL, numpy, torch) into validated RGB PIL images.

Every image that enters the library (queries and exemplar images) passes through `to_rgb_image`, so modes,
bit depths and sizes are handled in one place and bad input fails early with an error that names the fix.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import PIL.Image
import torch


ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

#: Smallest side accepted for any image (FLUX.2's own image processor uses the same bound).
MIN_SIDE_LENGTH = 64


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scales an integer or float array to uint8. Floats are read as [0, 1]; 16-bit integers as [0, 65535]."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        max_value = 65535 if array.max(initial=0) > 255 else 255
        return (np.clip(array, 0, max_value) * (255.0 / max_value)).round().astype(np.uint8)
    raise ValueError(f"Unsupported image array dtype {array.dtype}; pass uint8, uint16 or float in [0, 1].")


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts any PIL mode to RGB: alpha is composited over white, 16-bit and float data are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert("RGB") clips these modes at 255 instead of rescaling them.
        array = np.asarray(image)
        if image.mode == "F":
            array = array.astype(np.float32)
        gray = _array_to_uint8(array)
        return PIL.Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} -> PIL."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot read an image from an array of shape {tuple(array.shape)}; "
            "pass (H, W), (H, W, 3|4) or (3|4, H, W)."
        )
    return PIL.Image.fromarray(_array_to_uint8(array))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA


def to_rgb_image(image: ImageInput, name: str = "image", min_side: int = MIN_SIDE_LENGTH) -> PIL.Image.Image:
    """Returns `image` as an RGB PIL image, or raises a `ValueError` naming the fix.

    Args:
        image: a PIL image of any mode (RGBA and LA are composited over white, 16-bit rescaled), a numpy array
            (uint8, uint16, or float in [0, 1]; (H, W), (H, W, C) or (C, H, W)), or a torch tensor laid out like
            the numpy array (values in [0, 1], the usual layout for image tensors being (C, H, W)).
        name: what the image is, for error messages (e.g. `"exemplar source"`).
        min_side: the smallest accepted width and height in pixels.
    """
    if isinstance(image, PIL.Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, torch.Tensor):
        rgb = _array_to_pil(image.detach().to("cpu", torch.float32).numpy())
        rgb = _pil_to_rgb(rgb)
    elif isinstance(image, np.ndarray):
        rgb = _pil_to_rgb(_array_to_pil(image))
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")

    width, height = rgb.size
    if width < min_side or height < min_side:
        raise ValueError(
            f"{name} is {width}x{height} pixels; both sides must be at least {min_side}. Upscale it first."
        )
    return rgb


def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
