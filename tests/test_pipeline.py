import copy

import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinPipeline

from diffusers_delta import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, semantic_delta
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_adapter,
    tiny_image_encoder,
    tiny_klein_pipeline,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def edit(pipe, seed=0, **kwargs):
    kwargs.setdefault("exemplar", (SOURCE, TARGET))
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(kwargs.pop("image", QUERY), generator=generator, output_type="np", **TEXT_KWARGS, **kwargs).images


def klein(pipe, seed=0):
    return Flux2KleinPipeline.__call__(
        pipe,
        image=QUERY,
        prompt="",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **TEXT_KWARGS,
    ).images


def test_fresh_adapter_and_scale_zero_reproduce_flux2_klein(delta_pipe):
    base = klein(tiny_klein_pipeline())
    assert base.shape == (1, 64, 64, 3)
    assert (edit(delta_pipe) == base).all()  # a fresh adapter adds exactly nothing
    randomize_(delta_pipe.delta_adapter)
    assert (edit(delta_pipe, delta_scale=0.0) == base).all()


def test_trained_like_adapter_changes_the_output_continuously(delta_pipe):
    base = edit(delta_pipe)
    randomize_(delta_pipe.delta_adapter)
    full, half = edit(delta_pipe), edit(delta_pipe, delta_scale=0.5)
    assert abs(full - base).max() > 1e-3
    assert 0 < abs(half - base).mean() < abs(full - base).mean()


def test_batch_of_three_queries_equals_three_single_calls(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    queries = [random_image(10), random_image(11), random_image(12)]
    batch = edit(delta_pipe, image=queries, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    singles = [edit(delta_pipe, image=q, seed=s)[0] for q, s in zip(queries, (5, 6, 7))]
    assert batch.shape == (3, 64, 64, 3)
    for got, expected in zip(batch, singles):
        assert abs(got - expected).max() < 1e-5


def test_delta_embeds_equal_exemplar_and_averaging_identical_pairs_changes_nothing(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    by_exemplar = edit(delta_pipe)
    tokens = delta_pipe.encode_exemplar((SOURCE, TARGET))
    assert tokens.shape == (1, 4, 32)
    assert (edit(delta_pipe, exemplar=None, delta_embeds=tokens) == by_exemplar).all()
    assert abs(edit(delta_pipe, exemplar=[(SOURCE, TARGET), (SOURCE, TARGET)]) - by_exemplar).max() < 1e-5


def test_exemplar_list_averages_semantic_deltas_or_adds_them(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    pairs = [(SOURCE, TARGET), (random_image(3), random_image(4))]
    preprocess = SiglipPreprocessor(32)
    deltas = semantic_delta(
        delta_pipe.image_encoder,
        images_to_siglip_pixels([p[0] for p in pairs], preprocess, "s"),
        images_to_siglip_pixels([p[1] for p in pairs], preprocess, "t"),
    )
    with torch.no_grad():
        expected = delta_pipe.delta_adapter(deltas.mean(0, keepdim=True))
        added = delta_pipe.delta_adapter(deltas.sum(0, keepdim=True))
    torch.testing.assert_close(delta_pipe.encode_exemplar(pairs), expected)
    # edit arithmetic: exemplars of different edits, their deltas added
    torch.testing.assert_close(delta_pipe.encode_exemplar(pairs, combine="sum"), added)
    by_call = edit(delta_pipe, exemplar=pairs, combine="sum")
    tokens = delta_pipe.encode_exemplar(pairs, combine="sum")
    assert (by_call == edit(delta_pipe, exemplar=None, delta_embeds=tokens)).all()
    assert (edit(delta_pipe, combine="sum") == edit(delta_pipe)).all()  # one pair: the same either way
    with pytest.raises(ValueError, match=r"combine must be one of \('mean', 'sum'\)"):
        delta_pipe.encode_exemplar(pairs, combine="max")


def test_text_free_path_equals_text_encoder_path(delta_pipe, tmp_path):
    randomize_(delta_pipe.delta_adapter)
    with_text = edit(delta_pipe)
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    delta_pipe.save_delta_adapter(tmp_path)
    assert (tmp_path / "empty_prompt_embeds.safetensors").is_file()

    text_free = FluxDeltaEditPipeline(
        scheduler=delta_pipe.scheduler,
        vae=delta_pipe.vae,
        transformer=delta_pipe.transformer,
        text_encoder=None,
        tokenizer=None,
        is_distilled=True,
    )
    text_free.set_progress_bar_config(disable=True)
    text_free.load_delta_adapter(tmp_path)
    assert (edit(text_free) == with_text).all()


def test_text_free_pipeline_without_stored_embeddings_says_what_to_do(delta_pipe):
    delta_pipe.text_encoder = None
    with pytest.raises(ValueError, match="empty_prompt_embeds.safetensors"):
        edit(delta_pipe)


def test_gradients_reach_only_adapter_parameters(delta_pipe):
    pipe = delta_pipe
    randomize_(pipe.delta_adapter)
    for model in (pipe.transformer, pipe.vae, pipe.image_encoder, pipe.text_encoder):
        model.requires_grad_(False)
    pipe.delta_adapter.requires_grad_(True)
    preprocess = SiglipPreprocessor(32)
    delta = semantic_delta(
        pipe.image_encoder,
        images_to_siglip_pixels([SOURCE], preprocess, "s"),
        images_to_siglip_pixels([TARGET], preprocess, "t"),
    )
    edit_tokens = pipe.delta_adapter(delta)  # (1, N, D_edit)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(2), torch.arange(4), torch.arange(1))
    prediction = pipe.transformer(
        hidden_states=torch.randn(1, 8, 16),
        encoder_hidden_states=torch.randn(1, 3, 48),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, 3))),
        joint_attention_kwargs={"delta_hidden_states": edit_tokens},
        return_dict=False,
    )[0]
    prediction.square().mean().backward()
    for model in (pipe.transformer, pipe.vae, pipe.image_encoder, pipe.text_encoder):
        assert all(p.grad is None for p in model.parameters())
    for name, parameter in pipe.delta_adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_from_pipe_reuses_weights_and_leaves_the_klein_pipeline_as_it_was():
    base = tiny_klein_pipeline()
    before = klein(base)
    pipe = FluxDeltaEditPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer is base.transformer and pipe.vae is base.vae and pipe.text_encoder is base.text_encoder
    pipe.register_modules(image_encoder=tiny_image_encoder())

    adapter = randomize_(tiny_adapter(pipe.transformer))
    pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    assert abs(edit(pipe) - before).max() > 1e-3
    assert (klein(base) == before).all()  # the shared transformer ignores the adapter when no edit is passed


def test_num_images_per_prompt_and_odd_modes(delta_pipe):
    rgba_query = QUERY.convert("RGBA")
    images = edit(delta_pipe, image=rgba_query, exemplar=(SOURCE.convert("L"), TARGET), num_images_per_prompt=2)
    assert images.shape == (2, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"exemplar": SOURCE}, ValueError, r"\(source, target\) pair"),
        ({"exemplar": (SOURCE,)}, ValueError, "pair of 2 images, got 1"),
        ({"exemplar": (SOURCE, TARGET, TARGET)}, ValueError, "pair of 2 images, got 3"),
        ({"exemplar": None}, ValueError, "exactly one of"),
        ({"delta_embeds": torch.zeros(1, 4, 32)}, ValueError, "exactly one of"),
        ({"exemplar": None, "delta_embeds": torch.zeros(1, 5, 32)}, ValueError, r"shape \(1 or batch, 4, 32\)"),
        ({"image": random_image(0, size=(32, 64))}, ValueError, "query is 32x64"),
        ({"exemplar": (SOURCE, random_image(3, size=(64, 20)))}, ValueError, "exemplar target is 64x20"),
        ({"image": [QUERY, random_image(3, size=(128, 64))]}, ValueError, "share a size"),
        ({"image": None}, ValueError, "query to edit"),
    ],
)
def test_bad_input_gets_a_clear_error(delta_pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        edit(delta_pipe, **kwargs)


def test_editing_without_an_adapter_says_to_load_one(delta_pipe):
    delta_pipe.unload_delta_adapter()
    with pytest.raises(RuntimeError, match="load_delta_adapter"):
        edit(delta_pipe)


def test_output_is_pil_by_default(delta_pipe):
    image = delta_pipe(QUERY, exemplar=(SOURCE, TARGET), **TEXT_KWARGS).images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (64, 64)


def test_model_cpu_offload_keeps_the_adapter_placed_and_the_output_unchanged(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    expected = edit(delta_pipe)
    delta_pipe.enable_model_cpu_offload(device="cpu")  # the hooks and placement logic, on the only device here
    hooked = {type(getattr(model, "_hf_hook", None)).__name__ for model in (delta_pipe.transformer, delta_pipe.vae)}
    assert hooked == {"CpuOffload"} and not hasattr(delta_pipe.delta_adapter, "_hf_hook")
    assert (edit(delta_pipe) == expected).all()


def test_bfloat16_pipeline_edits(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.to(torch.bfloat16)
    images = edit(delta_pipe)
    assert images.shape == (1, 64, 64, 3) and images.dtype.kind == "f"
    assert delta_pipe.encode_exemplar((SOURCE, TARGET)).dtype == torch.bfloat16


def test_whole_pipeline_save_and_from_pretrained_keeps_the_adapter(delta_pipe, tmp_path):
    randomize_(delta_pipe.delta_adapter)
    expected = edit(delta_pipe)
    delta_pipe.save_pretrained(tmp_path)
    reloaded = FluxDeltaEditPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert len(reloaded.delta_processors) == 3
    assert (edit(reloaded) == expected).all()


def test_one_mixin_gives_a_users_own_klein_pipeline_the_whole_interface(delta_pipe, tmp_path):
    """`DeltaAdapterMixin` on any `Flux2KleinPipeline` class: load, scale, encode, adapt, reset, save, unload."""
    from diffusers_delta import DeltaAdapterMixin

    class MyKleinPipeline(DeltaAdapterMixin, Flux2KleinPipeline):
        pass

    randomize_(delta_pipe.delta_adapter, std=0.3)
    delta_pipe.save_delta_adapter(tmp_path / "adapter")
    components = {name: getattr(delta_pipe, name) for name in ("scheduler", "vae", "text_encoder", "tokenizer")}
    pipe = MyKleinPipeline(**components, transformer=delta_pipe.transformer, is_distilled=True)
    pipe.load_delta_adapter(tmp_path / "adapter")
    pipe.set_delta_adapter_scale(0.5)
    assert pipe.get_delta_adapter_scale()["double"] == [0.5] * len(pipe.delta_adapter.double_blocks)
    tokens = pipe.encode_exemplar((SOURCE, TARGET))
    torch.testing.assert_close(tokens, delta_pipe.encode_exemplar((SOURCE, TARGET)))
    loaded = copy.deepcopy(pipe.delta_adapter.state_dict())
    result = pipe.adapt_to_exemplar(SOURCE, TARGET, num_steps=2, generator=torch.Generator().manual_seed(0),
                                    max_sequence_length=16, text_encoder_out_layers=(1, 2, 3))  # fmt: skip
    assert len(result.losses) == 2
    assert any(not torch.equal(loaded[k], v) for k, v in pipe.delta_adapter.state_dict().items())
    pipe.reset_delta_adapter()
    assert all(torch.equal(loaded[k], v) for k, v in pipe.delta_adapter.state_dict().items())
    with pipe.adapted_to_exemplar(SOURCE, TARGET, num_steps=1, max_sequence_length=16,
                                  text_encoder_out_layers=(1, 2, 3)):  # fmt: skip
        pass
    pipe.save_delta_adapter(tmp_path / "again")
    assert (tmp_path / "again" / "diffusion_pytorch_model.safetensors").is_file()
    pipe.unload_delta_adapter()
    assert pipe.delta_adapter is None


def test_height_and_width_set_the_output_size_as_klein_takes_them(delta_pipe):
    unit = delta_pipe.vae_scale_factor * 2
    height, width = 96, 64  # multiples of it
    kwargs = {"exemplar": (SOURCE, TARGET), "output_type": "np", **TEXT_KWARGS}
    assert delta_pipe(QUERY, height=height, width=width, **kwargs).images.shape == (1, height, width, 3)
    default = delta_pipe(QUERY, **kwargs).images
    assert default.shape[1:3] == (QUERY.height // unit * unit, QUERY.width // unit * unit)  # the query's size
    with pytest.raises(ValueError, match=f"height must be a multiple of {unit}"):
        delta_pipe(QUERY, height=height + 1, width=width, **kwargs)
    with pytest.raises(ValueError, match="Give both height and width"):
        delta_pipe(QUERY, height=height, **kwargs)
