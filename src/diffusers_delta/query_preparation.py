"""`QueryPreparationMixin`: the query images of an edit, checked and sized as the pipeline's backbone takes them."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .backbones import backbone_of
from .checks import positive_int
from .image_inputs import ImageInput, to_rgb_image


class QueryPreparationMixin:
    """Turns a call's query images into the pipeline's input tensor: RGB, checked, one size, resized when asked.

    Part of `DeltaAdapterMixin`; it uses the pipeline's `image_processor`, `vae_scale_factor`, `transformer` and
    `config` (a toy model's `image_size`, when it knows one size).
    """

    def _preprocess_queries(
        self, image: ImageInput | list[ImageInput], height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Query images -> (B, 3, H, W) in [-1, 1]: resized to `height` x `width` when given (multiples of 16),
        else sized as the backbone's pipeline sizes its reference image (`preprocess_query`)."""
        queries = self._query_images(image)
        self._check_output_size(height, width)
        multiple_of = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value is not None and (positive_int(value, name) % multiple_of):
                raise ValueError(f"{name} must be a multiple of {multiple_of}, got {value}.")
        backbone = backbone_of(self.transformer)
        processed = []
        for rgb in queries:
            if height is not None:  # the size asked for: the query is resized to it
                processed.append(self._preprocess_at_size(rgb, height, width))
            else:
                processed.append(backbone.preprocess_query(self, rgb))
        self._one_query_size({tuple(p.shape[-2:]) for p in processed})
        return torch.cat(processed, dim=0)

    def _preprocess_at_size(
        self, rgb: PIL.Image.Image, height: int, width: int, resize_mode: str = "default"
    ) -> torch.Tensor:
        """An image resized to `height` x `width` -> (1, 3, H, W) in [-1, 1], by `VaeImageProcessor`'s preprocessing,
        which every FLUX image processor inherits (FLUX.3's own `preprocess` sizes a reference by itself)."""
        return VaeImageProcessor.preprocess(
            self.image_processor, rgb, height=height, width=width, resize_mode=resize_mode
        )

    def _check_output_size(self, height: int | None, width: int | None) -> None:
        """`height` and `width` of a call: both or neither, and the one size a model that knows one size takes."""
        if (height is None) != (width is None):
            raise ValueError("Give both height and width (the output size), or neither (the query's size).")
        fixed = self.config.get("image_size")
        if height is not None and fixed is not None and (height, width) != (fixed, fixed):
            raise ValueError(f"This model edits only {fixed}x{fixed} images: height and width must be {fixed}.")

    @staticmethod
    def _one_query_size(sizes: set[tuple[int, int]]) -> tuple[int, int]:
        """The one (height, width) every query of a call has after preprocessing; several are refused."""
        if len(sizes) > 1:
            raise ValueError(
                f"Queries in one call must share a size after preprocessing, got {sorted(sizes)}: resize them to one "
                "size, or call the pipeline once per size."
            )
        return next(iter(sizes))

    def _query_images(self, image: ImageInput | list[ImageInput]) -> list:
        """The queries as RGB images (checked, EXIF-free), refused when a model that knows one size gets another, or
        (FLUX.2) when their aspect ratio or size is out of the image processor's limits."""
        queries = image if isinstance(image, list) else [image]
        if not queries:
            raise ValueError("image must be a query image or a non-empty list of them.")
        fixed = self.config.get("image_size")
        images = []
        for index, query in enumerate(queries):
            name = f"query {index}" if len(queries) > 1 else "query"
            rgb = to_rgb_image(query, name=name)
            if fixed is not None and rgb.size != (fixed, fixed):
                raise ValueError(
                    f"This model edits only {fixed}x{fixed} images and the {name} is {rgb.width}x{rgb.height}: resize "
                    f"it to {fixed}x{fixed} first (diffusers-delta edit does that for you)."
                )
            if hasattr(self.image_processor, "check_image_input"):  # FLUX.2's: its aspect-ratio and size limits
                self.image_processor.check_image_input(rgb)
            images.append(rgb)
        return images
