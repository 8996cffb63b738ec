import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessorPil

from diffusers_delta.image_inputs import pil_to_tensor
from diffusers_delta.semantic_delta import (
    SiglipPreprocessor,
    images_to_siglip_pixels,
    semantic_delta,
    token_layer_norm,
)
from diffusers_delta.testing import random_image, tiny_image_encoder


def test_preprocessor_matches_siglip_image_processor():
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image = random_image(0, size=(96, 80)).resize((32, 32))  # same size: only rescale and normalise differ
    ours = SiglipPreprocessor.from_feature_extractor(processor)(pil_to_tensor(image).unsqueeze(0))
    theirs = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_preprocessor_is_differentiable_and_resizes():
    pixels = torch.rand(2, 3, 70, 90, requires_grad=True)
    out = SiglipPreprocessor(32)(pixels)
    assert out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_token_layer_norm_normalises_each_token_without_affine():
    features = torch.randn(2, 5, 32) * 7 + 3
    normed = token_layer_norm(features)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    torch.testing.assert_close(token_layer_norm(features * 5), normed, atol=1e-4, rtol=0)  # magnitude-invariant


def test_semantic_delta_shape_sign_and_identity():
    encoder = tiny_image_encoder()
    preprocessor = SiglipPreprocessor(32)
    source = images_to_siglip_pixels([random_image(1), random_image(2)], preprocessor, "source")
    target = images_to_siglip_pixels([random_image(3), random_image(4)], preprocessor, "target")
    with torch.no_grad():
        delta = semantic_delta(encoder, source, target)
        assert delta.shape == (2, 16, 32)  # 16 patches of 32 features
        torch.testing.assert_close(semantic_delta(encoder, target, source), -delta)
        assert semantic_delta(encoder, source, source).abs().max() == 0


def test_images_to_siglip_pixels_names_the_bad_image():
    with pytest.raises(ValueError, match="exemplar source 1 is 10x10"):
        images_to_siglip_pixels(
            [random_image(0), random_image(1, size=(10, 10))], SiglipPreprocessor(32), "exemplar source"
        )
