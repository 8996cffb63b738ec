"""Turning user images (PIL, numpy, torch) into validated RGB PIL images.

Every image that enters the library (queries and exemplar images) passes through `to_rgb_image`, so modes,
bit depths and sizes are handled in one place and bad input fails early with an error that names the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

#: Smallest side accepted for any image (FLUX.2's own image processor uses the same bound).
MIN_SIDE_LENGTH = 64


def _array_to_uint8(array: np.ndarray, integer_max: int | None = None) -> np.ndarray:
    """Scales an image array to uint8, refusing values outside the range its type stands for.

    uint8 is taken as it is; float as [0, 1] (diffusers' image processor reads float images so); uint16 as
    [0, 65535]; other integer types as [0, 255], or [0, `integer_max`] when given.
    """
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("The image holds NaN or infinite values.")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float images must hold values in [0, 1], as diffusers' image processor takes them; this one spans "
                f"[{low:.4g}, {high:.4g}]. Divide 0-255 images by 255, and map -1..1 images with (x + 1) / 2."
            )
        return (array * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        max_value = integer_max or (65535 if array.dtype == np.uint16 else 255)
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > max_value:
            raise ValueError(
                f"Integer images of type {array.dtype} must hold values in [0, {max_value}], this one spans "
                f"[{low}, {high}]. Pass uint8 (0-255), uint16 (0-65535) or float (0-1) images."
            )
        return (array.astype(np.float64) * (255.0 / max_value)).round().astype(np.uint8)
    raise ValueError(f"Unsupported image array dtype {array.dtype}; pass uint8, uint16 or float in [0, 1].")


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts any PIL mode to RGB: alpha is composited over white, 16-bit and float data are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert("RGB") clips these modes at 255 instead of rescaling them. 16-bit modes span 0-65535;
        # 32-bit integer images do when any value exceeds 255 (16-bit PNGs open as "I"); float images span 0-255,
        # as PIL's own conversions read them.
        array = np.asarray(image)
        if image.mode == "F":
            array = array.astype(np.float32) / 255.0
            integer_max = None
        elif image.mode == "I":
            integer_max = 65535 if array.max(initial=0) > 255 else 255
        else:
            integer_max = 65535
        gray = _array_to_uint8(array, integer_max)
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
            the numpy array (float values in [0, 1], the usual layout for image tensors being (C, H, W)). NaN,
            infinity and values outside the range of the type are refused, never clipped.
        name: what the image is, for error messages (e.g. `"exemplar source"`).
        min_side: the smallest accepted width and height in pixels.
    """
    try:
        if isinstance(image, PIL.Image.Image):
            rgb = _pil_to_rgb(image)
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().to("cpu")
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32)  # numpy has no bfloat16
            rgb = _pil_to_rgb(_array_to_pil(tensor.numpy()))
        elif isinstance(image, np.ndarray):
            rgb = _pil_to_rgb(_array_to_pil(image))
        else:
            raise TypeError(
                f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}."
            )
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None

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


def fit_to_model_size(
    image_size: int | None, images: list[PIL.Image.Image], names: Sequence[str] | None = None
) -> list[PIL.Image.Image]:
    """For a model that knows one image size only (a pipeline's `config.image_size`, as the toy model's 64), the
    images in RGB (alpha over white) resized to it (bicubic); for any other model, the images as they are. An image
    too small for any model (a side under `MIN_SIDE_LENGTH`) is refused, not blown up.

    Args:
        image_size: the model's one image side, or None.
        images: PIL images.
        names: what each image is, for error messages (default: "image").
    """
    if image_size is None or all(image.size == (image_size, image_size) for image in images):
        return images
    names = names or ["image"] * len(images)
    return [
        to_rgb_image(image, name=name).resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
        for image, name in zip(images, names)
    ]


#: EXIF orientations that turn the stored picture a quarter turn: its displayed width and height are swapped.
_QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


@contextmanager
def _opened(path, what: str):
    """`PIL.Image.open`, its errors one `ValueError` naming the file (a decompression bomb among them)."""
    try:
        with PIL.Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist.") from None
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{what} {path} is too large to decode safely ({error}).") from None
    except (OSError, PIL.UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"{what} {path} is not a readable image ({error}).") from None


def read_image_file(path, what: str = "image") -> PIL.Image.Image:
    """An image file, fully read (so a truncated file fails here, not after a model has loaded) and turned upright
    by its EXIF orientation, as `diffusers.utils.load_image` and viewers show it.

    Args:
        path: the file.
        what: what the image is, for error messages (e.g. `"query"`).

    Raises:
        ValueError: naming the file, when it does not exist, is not a readable image or is too large to decode.
    """
    with _opened(path, what) as image:
        image.load()
        return PIL.ImageOps.exif_transpose(image)  # a copy, upright


def read_image_size(path, what: str = "image") -> tuple[int, int]:
    """The (width, height) an image file is displayed at (its EXIF orientation applied), from its header only.

    Raises:
        ValueError: as `read_image_file`.
    """
    with _opened(path, what) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION, 1) in _QUARTER_TURN_ORIENTATIONS:
            return height, width
        return width, height
