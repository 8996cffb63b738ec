"""The semantic delta: what an edit changes, in SigLIP's patch-feature space.

`delta = LN(f_tgt) - LN(f_src)` per patch token, where `f` is SigLIP's `last_hidden_state` (before any pooling) and
`LN` is a layer norm over the feature dimension without affine parameters (Delta-Adapter, section 4.2). The
normalisation removes instance-dependent magnitudes and keeps the direction of change.

Images reach SigLIP through `SiglipPreprocessor`, a differentiable torch re-implementation of the resize/normalise
that `SiglipImageProcessor` does, reading its settings from that processor. Inference and the training losses use
the same function, so the adapter sees identical features at training and at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from .image_inputs import ImageInput, pil_to_tensor, to_rgb_image


class SiglipPreprocessor:
    """Resizes and normalises (B, 3, H, W) images in [0, 1] for SigLIP, differentiably.

    Args:
        image_size: the square side SigLIP expects (e.g. 384 for `siglip-so400m-patch14-384`).
        image_mean: per-channel mean subtracted after rescaling to [0, 1].
        image_std: per-channel standard deviation divided by.
    """

    def __init__(self, image_size: int, image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.image_size = int(image_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)

    @classmethod
    def from_feature_extractor(cls, feature_extractor: SiglipImageProcessorPil) -> "SiglipPreprocessor":
        """Reads size, mean and std from a SigLIP image processor (the adapter folder's `feature_extractor/`)."""
        size = feature_extractor.size
        height, width = size["height"], size["width"]
        if height != width:
            raise ValueError(f"SigLIP preprocessing must be square, the feature extractor asks for {height}x{width}.")
        return cls(height, feature_extractor.image_mean, feature_extractor.image_std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised, same dtype and device (computed in float32)."""
        dtype, pixels = pixels.dtype, pixels.float()
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(dtype)


def images_to_siglip_pixels(images: Sequence[ImageInput], preprocessor: SiglipPreprocessor, name: str) -> torch.Tensor:
    """Validates user images and stacks them, resized for SigLIP: -> (B, 3, S, S) float32 on the CPU, normalised."""
    resized = []
    for index, image in enumerate(images):
        rgb = to_rgb_image(image, name=f"{name} {index}" if len(images) > 1 else name)
        resized.append(preprocessor(pil_to_tensor(rgb).unsqueeze(0)))  # (1, 3, S, S)
    return torch.cat(resized, dim=0)


def token_layer_norm(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Layer norm of each token over its feature dimension, without affine parameters: (B, P, D) -> (B, P, D)."""
    return F.layer_norm(features, features.shape[-1:], eps=eps)


def patch_features(image_encoder: SiglipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """SigLIP patch tokens before pooling: (B, 3, S, S) normalised pixels -> (B, P, D)."""
    return image_encoder(pixel_values=pixel_values).last_hidden_state


def delta_from_features(source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """`LN(f_tgt) - LN(f_src)`, in float32 whatever the features' dtype: (B, P, D), (B, P, D) -> (B, P, D) float32.

    SigLIP's patch features have outlier channels; a bfloat16 layer norm and subtraction would lose a few percent of
    the small differences the delta is made of, and inference and training would see different deltas.
    """
    return token_layer_norm(target_features.float()) - token_layer_norm(source_features.float())


def semantic_delta(
    image_encoder: SiglipVisionModel, source_pixels: torch.Tensor, target_pixels: torch.Tensor
) -> torch.Tensor:
    """The normalised semantic delta of exemplar pairs.

    Both images of every pair go through the encoder in one batch.

    Args:
        image_encoder: a SigLIP (or SigLIP 2) vision model.
        source_pixels: (B, 3, S, S) preprocessed source images.
        target_pixels: (B, 3, S, S) preprocessed target images, pairwise with `source_pixels`.

    Returns:
        (B, P, D) delta in float32, P patch tokens of D features.
    """
    features = patch_features(image_encoder, torch.cat([source_pixels, target_pixels], dim=0))  # (2B, P, D)
    source_features, target_features = features.chunk(2, dim=0)
    return delta_from_features(source_features, target_features)
