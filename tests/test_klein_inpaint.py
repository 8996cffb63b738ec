"""Masked edits: `FluxDeltaInpaintPipeline`, the exemplar's edit inside a mask through klein's inpainting loop."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline

from diffusers_delta import FluxDeltaInpaintPipeline
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_delta_pipeline, tiny_klein_components


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def half_mask(value_left=255, value_right=0) -> PIL.Image.Image:
    """White (edit) on the left half, black (keep) on the right: 32 pixels, whole latent cells either side."""
    mask = np.full((64, 64), value_right, dtype=np.uint8)
    mask[:, :32] = value_left
    return PIL.Image.fromarray(mask)


def masked(pipe, mask, seed=0, **kwargs):
    kwargs.setdefault("exemplar", (SOURCE, TARGET))
    generator = torch.Generator().manual_seed(seed)
    return pipe(QUERY, mask_image=mask, generator=generator, **TEXT_KWARGS, **kwargs).images


def upstream(mask, output_type="np"):
    pipe = Flux2KleinInpaintPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt="",
        image=QUERY,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=4,
        generator=generator,
        output_type=output_type,
        **TEXT_KWARGS,
    ).images


@pytest.fixture
def inpaint_pipe(delta_pipe):
    """A masked-edit pipeline sharing a tiny klein pipeline's models and a trained-like adapter (`from_pipe`)."""
    randomize_(delta_pipe.delta_adapter)
    return FluxDeltaInpaintPipeline.from_pipe(delta_pipe)


def test_scale_zero_is_upstream_inpainting(inpaint_pipe):
    assert (masked(inpaint_pipe, half_mask(), delta_scale=0.0, output_type="np") == upstream(half_mask())).all()


def test_the_edit_shows_inside_the_mask_and_the_rest_is_upstreams(inpaint_pipe):
    base = masked(inpaint_pipe, half_mask(), delta_scale=0.0, output_type="latent")  # (1, C, 16, 16)
    edited = masked(inpaint_pipe, half_mask(), output_type="latent")
    assert (edited[..., 8:] == base[..., 8:]).all()  # kept: the query's latents, as upstream puts them back
    assert (edited[..., :8] - base[..., :8]).abs().max() > 1e-3


def test_a_mask_of_zeros_leaves_the_query_as_upstream_does(inpaint_pipe):
    nothing = half_mask(0, 0)
    assert (masked(inpaint_pipe, nothing, output_type="np") == upstream(nothing)).all()


def test_bad_masks_get_clear_errors(inpaint_pipe):
    with pytest.raises(ValueError, match="mask_image is 32x64 and the query 64x64"):
        masked(inpaint_pipe, half_mask().resize((32, 64)))
    with pytest.raises(ValueError, match="mask_image is required"):
        masked(inpaint_pipe, None)
    with pytest.raises(ValueError, match="one query"):
        inpaint_pipe([QUERY, QUERY], mask_image=half_mask(), exemplar=(SOURCE, TARGET))
    with pytest.raises(ValueError, match="strength"):
        masked(inpaint_pipe, half_mask(), strength=0.0)


def test_guidance_without_a_prompt_is_refused_on_a_base_model(inpaint_pipe):
    inpaint_pipe.register_to_config(is_distilled=False)
    with pytest.raises(ValueError, match="no prompt"):
        masked(inpaint_pipe, half_mask(), guidance_scale=4.0)


def test_from_pipe_refuses_another_backbones_pipeline_naming_the_one_to_use():
    kontext = tiny_delta_pipeline(backbone="flux1")
    with pytest.raises(ValueError, match=r"runs on FLUX.2 \[klein\] bases.*use FluxKontextDeltaEditPipeline"):
        FluxDeltaInpaintPipeline.from_pipe(kontext)
