import numpy as np
import pytest
import torch

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.adaptation import AdaptationConfig, parse_setting
from diffusers_delta.semantic_delta import SiglipPreprocessor
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_klein_components
from diffusers_delta.training import DeltaAdapterObjective


SOURCE, TARGET, QUERY = random_image(1), random_image(2), random_image(0)
FAST = {"num_steps": 6, "learning_rate": 1e-2, **TEXT_KWARGS}


def adapt(pipe, seed=0, **kwargs):
    return pipe.adapt_to_exemplar(SOURCE, TARGET, generator=torch.Generator().manual_seed(seed), **{**FAST, **kwargs})


def edit(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(QUERY, exemplar=(SOURCE, TARGET), generator=generator, output_type="np", **TEXT_KWARGS).images


def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def same(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def pipe(delta_pipe):
    randomize_(delta_pipe.delta_adapter, std=0.05)
    delta_pipe._remember_loaded_adapter(delta_pipe.delta_adapter, "org/delta-adapter")  # as if loaded like this
    return delta_pipe


def test_only_adapter_weights_change(pipe):
    frozen = {name: state(getattr(pipe, name)) for name in ("transformer", "vae", "image_encoder", "text_encoder")}
    before = state(pipe.delta_adapter)
    result = adapt(pipe)
    assert len(result.losses) == len(result.flow_matching) == len(result.delta_consistency) == 6
    assert not same(before, state(pipe.delta_adapter))
    assert all(same(saved, state(getattr(pipe, name))) for name, saved in frozen.items())
    assert all(not p.requires_grad for p in pipe.delta_adapter.parameters()) and not pipe.delta_adapter.training


@pytest.mark.parametrize("trainable", ["edit_tokens", "injection"])
def test_only_the_chosen_part_of_the_adapter_moves(pipe, trainable, tmp_path):
    before = state(pipe.delta_adapter)
    adapt(pipe, config=AdaptationConfig(trainable=trainable))
    after = state(pipe.delta_adapter)
    moved = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert moved == ({"refiner", "resampler", "token_projection"} if trainable == "edit_tokens"
                     else {"double_blocks", "single_blocks"})  # fmt: skip
    assert all(not p.requires_grad for p in pipe.delta_adapter.parameters())
    pipe.save_delta_adapter(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert f"moving only its `{trainable}` weights" in card
    assert "on the pair at most 512² (scaled down when larger)" in card
    with pytest.raises(ValueError, match="trainable must be one of"):
        AdaptationConfig(trainable="blocks")


def test_the_loss_goes_down_on_held_out_noise(pipe):
    pair = pipe._encode_pair_for_training(SOURCE, TARGET, "cpu")
    prompt = pipe._text_conditioning("", **TEXT_KWARGS)["prompt_embeds"].detach()
    objective = DeltaAdapterObjective(
        pipe.delta_adapter, pipe.transformer, pipe.vae, pipe.image_encoder, SiglipPreprocessor(32), prompt
    )
    batch = {key: value.expand(8, *value.shape[1:]) for key, value in pair.items()}
    noise = torch.randn((8, *pair["target_latents"].shape[1:]), generator=torch.Generator().manual_seed(9))

    def held_out_loss():
        with torch.no_grad():
            return objective(**batch, noise=noise, sigmas=torch.linspace(0.1, 0.9, 8))["loss"].item()

    pipe._attach_delta_processors(pipe.delta_adapter)
    before = held_out_loss()
    result = adapt(pipe, num_steps=20)
    after = held_out_loss()
    assert after < before - 0.05
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_reset_restores_bit_for_bit_and_adapting_twice_starts_from_the_loaded_weights(pipe):
    loaded, base_output = state(pipe.delta_adapter), edit(pipe)
    adapt(pipe)
    first = state(pipe.delta_adapter)
    assert not (edit(pipe) == base_output).all()
    adapt(pipe)
    assert same(first, state(pipe.delta_adapter))  # from the loaded weights again, same seed: same result
    adapt(pipe, from_loaded=False)
    assert not same(first, state(pipe.delta_adapter))  # continued from the adapted weights
    pipe.reset_delta_adapter()
    assert same(loaded, state(pipe.delta_adapter)) and (edit(pipe) == base_output).all()


def test_adaptation_is_deterministic_with_a_generator(pipe):
    first = adapt(pipe, seed=3)
    weights = state(pipe.delta_adapter)
    second = adapt(pipe, seed=3)
    assert first.losses == second.losses and same(weights, state(pipe.delta_adapter))
    third = adapt(pipe, seed=4)
    assert third.losses != first.losses


def test_context_manager_restores_even_after_an_exception(pipe):
    loaded = state(pipe.delta_adapter)
    with pytest.raises(KeyError):
        with pipe.adapted_to_exemplar(SOURCE, TARGET, generator=torch.Generator().manual_seed(0), **FAST) as result:
            assert len(result.losses) == 6 and not same(loaded, state(pipe.delta_adapter))
            raise KeyError("user code fails")
    assert same(loaded, state(pipe.delta_adapter))


def test_per_block_scales_survive_adaptation(pipe):
    pipe.set_delta_adapter_scale({"double": [0.5], "single": [0.25, 1.0]})
    adapt(pipe)
    assert [p.scale for p in pipe.delta_processors.values()] == [0.5, 0.25, 1.0]


def test_adapted_adapter_saves_with_its_card_reloads_and_edits_the_same(pipe, tmp_path):
    adapt(pipe)
    expected = edit(pipe)
    pipe.save_delta_adapter(tmp_path, base_model="black-forest-labs/FLUX.2-klein-4B")
    card = (tmp_path / "README.md").read_text()
    assert "adapted at test time" in card and "`org/delta-adapter`" in card and "6 steps" in card
    fresh = FluxDeltaEditPipeline(**tiny_klein_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.load_delta_adapter(tmp_path)
    assert (edit(fresh) == expected).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_steps": 0}, ValueError, "num_steps must be at least 1"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"config": AdaptationConfig(noise_samples=2), "num_steps": -1}, ValueError, "num_steps"),
    ],
)
def test_bad_settings_are_refused_before_anything_changes(pipe, kwargs, error, message):
    before = state(pipe.delta_adapter)
    with pytest.raises(error, match=message):
        adapt(pipe, **kwargs)
    assert same(before, state(pipe.delta_adapter))


def test_bad_exemplar_and_non_finite_loss_leave_the_adapter_as_it_was(pipe, monkeypatch):
    adapt(pipe)  # an adapter already adapted once: that is the state to keep
    before, processors = state(pipe.delta_adapter), dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="exemplar source is 10x10"):
        pipe.adapt_to_exemplar(random_image(0, (10, 10)), TARGET, **FAST)

    forward = DeltaAdapterObjective.forward
    calls = []

    def nan_on_third_step(self, *args, **kwargs):
        terms = forward(self, *args, **kwargs)
        calls.append(1)
        return {**terms, "loss": terms["loss"] * float("nan")} if len(calls) == 3 else terms

    monkeypatch.setattr(DeltaAdapterObjective, "forward", nan_on_third_step)
    with pytest.raises(FloatingPointError, match="at step 3: lower learning_rate"):
        adapt(pipe)
    assert same(before, state(pipe.delta_adapter))
    assert dict(pipe.transformer.attn_processors) == processors


def test_model_cpu_offload_is_refused_with_the_reason(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match="offloading keeps on different devices"):
        adapt(pipe)


def test_bfloat16_pipeline_adapts_with_float32_master_weights(pipe):
    pipe.to(torch.bfloat16)
    result = adapt(pipe, num_steps=2)
    assert pipe.delta_adapter.dtype == torch.bfloat16 and all(torch.isfinite(torch.tensor(result.losses)))


def test_the_pairs_views_are_the_same_change_of_both_images():
    from diffusers_delta.adaptation import pair_views

    views = pair_views(SOURCE, TARGET, "flip_crop")
    assert len(views) == 4 and views[0] == (SOURCE, TARGET)
    assert all(view[0].size == view[1].size == SOURCE.size for view in views)
    mirrored = [np.asarray(image) for image in views[1]]
    assert np.array_equal(mirrored[0], np.asarray(SOURCE)[:, ::-1]) and np.array_equal(mirrored[1],
                                                                                     np.asarray(TARGET)[:, ::-1])
    assert pair_views(SOURCE, TARGET, "none") == [(SOURCE, TARGET)]


def test_an_anchor_keeps_the_adapter_nearer_the_weights_it_started_from(pipe):
    start = state(pipe.delta_adapter)

    def moved():
        now = state(pipe.delta_adapter)
        return sum(float(((now[k] - start[k]) ** 2).sum()) for k in start)

    adapt(pipe)
    free = moved()
    adapt(pipe, config=AdaptationConfig(anchor_weight=1e6))  # from the loaded weights again
    assert moved() < 0.5 * free


def test_early_stopping_keeps_the_weights_of_its_best_held_out_measurement(pipe, tmp_path):
    """Held-out losses are measured at the start and every `eval_every` steps on a view it does not train on; the
    weights kept are those of the lowest one (the start's, when none beats it)."""
    start = state(pipe.delta_adapter)
    config = AdaptationConfig(augment="flip_crop", early_stopping=True, eval_every=2)
    result = adapt(pipe, config=config)
    steps = [step for step, _ in result.held_out]
    assert steps == [0, 2, 4, 6] and len(result.losses) == 6
    best_step = min(result.held_out, key=lambda measured: measured[1])[0]
    assert result.kept_step == best_step
    if best_step == 0:
        assert same(start, state(pipe.delta_adapter))
    again = adapt(pipe, config=config)
    assert again.held_out == result.held_out  # deterministic with a generator
    pipe.save_delta_adapter(tmp_path)  # the card says how it was adapted, guards included
    assert "on its `flip_crop` views, keeping the weights of its best held-out measurement" in (
        tmp_path / "README.md"
    ).read_text()
    edited = edit(pipe)
    pipe.reset_delta_adapter()
    assert same(start, state(pipe.delta_adapter)) and edited.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "setting, message",
    [({"augment": "rotate"}, "augment must be one of"), ({"anchor_weight": -1.0}, "anchor_weight"),
     ({"eval_every": 0}, "eval_every")],
)  # fmt: skip
def test_bad_guard_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        AdaptationConfig(**setting)


def test_a_large_exemplar_is_adapted_at_the_resolution_asked_for_with_the_same_delta(pipe):
    full = pipe._encode_pair_for_training(SOURCE, TARGET, "cpu")
    scaled = pipe._encode_pair_for_training(SOURCE, TARGET, "cpu", resolution=32)  # 64² -> 32²
    assert [side // 2 for side in full["target_latents"].shape[-2:]] == list(scaled["target_latents"].shape[-2:])
    for name in ("source_features", "target_features"):
        assert torch.equal(full[name], scaled[name])
    wide = pipe._encode_pair_for_training(random_image(3, (128, 64)), random_image(4, (128, 64)), "cpu", 32)
    height, width = wide["source_latents"].shape[-2:]
    pixels_per_latent = 64 // full["source_latents"].shape[-1]
    assert width > height and (height * width) * pixels_per_latent**2 <= 32**2  # aspect kept, to multiples
    assert torch.equal(pipe._encode_pair_for_training(SOURCE, TARGET, "cpu", 64)["target_latents"],
                       full["target_latents"])  # fmt: skip  # not larger: as it is

    at_full_size = adapt(pipe, config=AdaptationConfig(resolution=None)).losses
    at_32 = adapt(pipe, config=AdaptationConfig(resolution=32)).losses
    assert at_full_size != at_32 and all(np.isfinite(at_32))
    assert pipe._delta_adaptation["resolution"] == 32
    assert parse_setting("resolution=none").resolution is None and parse_setting("resolution=256").resolution == 256
    with pytest.raises(ValueError, match="resolution"):
        AdaptationConfig(resolution=0)
