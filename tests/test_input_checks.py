"""Nothing silent: non-finite or out-of-range input, malformed scales and settings are refused with an error that says
what to pass, before anything changes; callbacks and one-size models behave as a diffusers user expects."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.image_inputs import to_rgb_image
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_adapter,
    tiny_image_encoder,
    tiny_klein_components,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def edit(pipe, **kwargs):
    kwargs = {"exemplar": (SOURCE, TARGET), **kwargs}
    return pipe(QUERY, generator=torch.Generator().manual_seed(0), output_type="np", **TEXT_KWARGS, **kwargs).images


@pytest.fixture
def trained_pipe(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    return delta_pipe


NAN_IMAGE = np.full((64, 64, 3), np.nan, dtype=np.float32)


@pytest.mark.parametrize(
    "image, message",
    [
        (NAN_IMAGE, "NaN or infinite"),
        (torch.full((3, 64, 64), float("inf")), "NaN or infinite"),
        (np.full((64, 64, 3), 200.0, dtype=np.float32), r"in \[0, 1\].*Divide 0-255 images by 255"),
        (torch.full((3, 64, 64), -0.5), r"in \[0, 1\].*\(x \+ 1\) / 2"),
        (np.full((64, 64, 3), 300, dtype=np.int64), r"int64 must hold values in \[0, 255\]"),
        (np.full((64, 64, 3), -1, dtype=np.int16), r"int16 must hold values in \[0, 255\]"),
    ],
    ids=["nan", "inf-tensor", "float-0-255", "float-minus-one", "int-over-255", "negative-int"],
)
def test_non_finite_and_out_of_range_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_image(image, name="query")


def test_uint8_tensors_and_16_bit_arrays_are_read_in_their_own_range():
    assert to_rgb_image(torch.full((3, 64, 64), 255, dtype=torch.uint8)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(np.full((64, 64), 255, dtype=np.uint16)).getpixel((0, 0)) == (1, 1, 1)


@pytest.mark.parametrize("where", ["image", "source", "target"])
def test_a_nan_image_anywhere_is_refused_by_the_pipeline(trained_pipe, where):
    images = {"image": QUERY, "source": SOURCE, "target": TARGET, where: NAN_IMAGE}
    with pytest.raises(ValueError, match="NaN"):
        trained_pipe(images["image"], exemplar=(images["source"], images["target"]), **TEXT_KWARGS)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"delta_scale": float("nan")}, ValueError, "delta_scale must be a finite number"),
        ({"delta_scale": "strong"}, TypeError, "delta_scale must be a number, got str"),
        ({"num_inference_steps": "4"}, TypeError, "num_inference_steps must be an integer"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be at least 1"),
        ({"guidance_scale": float("inf")}, ValueError, "guidance_scale must be a finite number"),
    ],
)
def test_bad_call_arguments_are_refused_up_front(trained_pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        edit(trained_pipe, **kwargs)


def test_an_unknown_output_type_is_refused(trained_pipe):
    with pytest.raises(ValueError, match="output_type must be one of"):
        trained_pipe(QUERY, exemplar=(SOURCE, TARGET), output_type="jpeg", **TEXT_KWARGS)


def test_delta_embeds_accept_numpy_and_refuse_nan(trained_pipe):
    tokens = trained_pipe.encode_exemplar((SOURCE, TARGET))
    expected = edit(trained_pipe, exemplar=None, delta_embeds=tokens)
    assert (edit(trained_pipe, exemplar=None, delta_embeds=tokens.numpy()) == expected).all()
    with pytest.raises(ValueError, match="delta_embeds holds NaN"):
        edit(trained_pipe, exemplar=None, delta_embeds=torch.full_like(tokens, float("nan")))
    with pytest.raises(TypeError, match="delta_embeds must be a torch tensor.*encode_exemplar"):
        edit(trained_pipe, exemplar=None, delta_embeds=tokens.tolist())


def test_negative_scales_push_away_from_the_edit(trained_pipe):
    base, forward, backward = (edit(trained_pipe, delta_scale=s) for s in (0.0, 1.0, -1.0))
    assert not (backward == base).all() and not (backward == forward).all()


@pytest.mark.parametrize(
    "scale, error, message",
    [
        (float("nan"), ValueError, "finite"),
        ({"double": [0.5], "single": [1.0, float("inf")]}, ValueError, "single-block scale must be a finite"),
        ({"double": [0.5], "single": [1.0, "x"]}, TypeError, "single-block scale must be a number"),
        ({"double": [0.5], "single": [1.0]}, ValueError, "1 single-block scales given, but the transformer has 2"),
        ({"double": "high"}, TypeError, "must be a number or a list of 1 numbers"),
        ({"both": 1.0}, ValueError, "'double' and/or 'single'"),
    ],
    ids=["nan", "partly-inf", "partly-str", "too-few", "str-group", "unknown-key"],
)
def test_a_refused_scale_sets_no_block(trained_pipe, scale, error, message):
    trained_pipe.set_delta_adapter_scale({"double": [0.25], "single": [0.75, 1.0]})
    with pytest.raises(error, match=message):
        trained_pipe.set_delta_adapter_scale(scale)
    assert trained_pipe.get_delta_adapter_scale() == {"double": [0.25], "single": [0.75, 1.0]}


def test_a_group_scale_may_be_one_number(trained_pipe):
    trained_pipe.set_delta_adapter_scale({"double": 0.5})
    assert trained_pipe.get_delta_adapter_scale() == {"double": [0.5], "single": [1.0, 1.0]}
    trained_pipe.set_delta_adapter_scale({"single": np.float32(0.0), "double": 0})
    assert (edit(trained_pipe) == edit(trained_pipe, delta_scale=0.0)).all()


def test_a_pipeline_built_with_encoder_and_adapter_gets_the_default_preprocessing():
    components = tiny_klein_components()
    adapter = tiny_adapter(components["transformer"])
    pipe = FluxDeltaEditPipeline(**components, image_encoder=tiny_image_encoder(), delta_adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.feature_extractor.size == {"height": 32, "width": 32}
    assert edit(pipe).shape == (1, 64, 64, 3)


def test_callbacks_see_and_replace_latents_and_prompt_embeds(trained_pipe):
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {}

    inputs = ["latents", "prompt_embeds"]
    plain = edit(trained_pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == (1, 64, 4 * 4) and seen[0][2][0] == 1
    assert (plain == edit(trained_pipe)).all()  # a callback that returns nothing changes nothing

    final = {}

    def keep_final_latents(pipe, step, timestep, tensors):
        final.update(tensors)
        return {}

    other_seed = trained_pipe(
        QUERY, exemplar=(SOURCE, TARGET), generator=torch.Generator().manual_seed(1), output_type="np",
        callback_on_step_end=keep_final_latents, **TEXT_KWARGS,
    ).images  # fmt: skip

    def swap_in_the_other_latents(pipe, step, timestep, tensors):
        return {"latents": final["latents"]} if step == 3 else {}

    swapped = edit(trained_pipe, callback_on_step_end=swap_in_the_other_latents)
    assert not (other_seed == plain).all() and (swapped == other_seed).all()  # what a callback returns is used


def test_a_one_size_model_refuses_other_sizes(trained_pipe):
    one_size = FluxDeltaEditPipeline.from_pipe(trained_pipe, image_size=64)
    one_size.set_progress_bar_config(disable=True)
    assert edit(one_size).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="edits only 64x64 images and the query is 96x64: resize it"):
        one_size(PIL.Image.new("RGB", (96, 64)), exemplar=(SOURCE, TARGET), **TEXT_KWARGS)
    with pytest.raises(ValueError, match="edits only 64x64"):
        one_size.adapt_to_exemplar(PIL.Image.new("RGB", (96, 64)), TARGET, num_steps=1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_steps": "5"}, TypeError, "num_steps must be an integer"),
        ({"lambda_delta": float("nan")}, ValueError, "lambda_delta must be a finite number"),
        ({"lambda_delta": -1.0}, ValueError, "lambda_delta must be at least 0"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate must be positive"),
    ],
)
def test_adaptation_settings_are_checked_before_anything_runs(trained_pipe, kwargs, error, message):
    before = {k: v.clone() for k, v in trained_pipe.delta_adapter.state_dict().items()}
    with pytest.raises(error, match=message):
        trained_pipe.adapt_to_exemplar(SOURCE, TARGET, **kwargs)
    after = trained_pipe.delta_adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_method_says_no_adapter_is_loaded_the_same_way():
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    calls = [
        lambda: pipe.adapted_to_exemplar(SOURCE, TARGET),
        lambda: pipe.adapt_to_exemplar(SOURCE, TARGET),
        lambda: pipe.encode_exemplar((SOURCE, TARGET)),
        lambda: pipe.reset_delta_adapter(),
        lambda: pipe.set_delta_adapter_scale(1.0),
        lambda: pipe.save_delta_adapter("unused"),
        lambda: pipe(QUERY, exemplar=(SOURCE, TARGET), **TEXT_KWARGS),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="^No Delta-Adapter is loaded: call pipe.load_delta_adapter"):
            call()


def test_a_bare_image_among_exemplar_pairs_is_named_by_its_place(trained_pipe):
    with pytest.raises(ValueError, match=r"exemplar 2 of 2 is not a \(source, target\) pair \(it is a Image\)"):
        trained_pipe.encode_exemplar([(SOURCE, TARGET), QUERY])
    with pytest.raises(ValueError, match=r"exemplar 1 of 2 is not a \(source, target\) pair \(it is 3 images\)"):
        trained_pipe.encode_exemplar([(SOURCE, TARGET, QUERY), (SOURCE, TARGET)])
