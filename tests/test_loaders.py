import json
import shutil

import pytest
import torch

from diffusers_delta import (
    DeltaAdapterModel,
    Flux2DeltaAttnProcessor,
    FluxDeltaEditPipeline,
    compute_empty_prompt_embeds,
)
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_adapter,
    tiny_image_encoder,
    tiny_klein_components,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def render(pipe, **kwargs):
    return pipe(QUERY, generator=torch.Generator().manual_seed(0), output_type="np", **TEXT_KWARGS, **kwargs).images


def edit(pipe):
    return render(pipe, exemplar=(SOURCE, TARGET))


@pytest.fixture
def adapter_folder(delta_pipe, tmp_path):
    """A trained-like adapter saved by `save_delta_adapter`, and the output it gives."""
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    folder = tmp_path / "adapter"
    delta_pipe.save_delta_adapter(folder)
    return folder, edit(delta_pipe)


@pytest.fixture
def bare_pipe():
    """A pipeline with no adapter and no image encoder."""
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(pipe):
    """Everything a failed load must leave untouched."""
    return {
        "processors": dict(pipe.transformer.attn_processors),
        "components": dict(pipe.components),
        "embeds": pipe.empty_prompt_embeds,
        "output": render(pipe, exemplar=(SOURCE, TARGET)) if pipe.delta_adapter is not None else None,
    }


def assert_unchanged(pipe, before):
    after = snapshot(pipe)
    assert after["processors"] == before["processors"]  # the very same processor objects
    assert after["components"].keys() == before["components"].keys()
    assert all(after["components"][k] is v for k, v in before["components"].items())
    assert after["embeds"] is before["embeds"]
    if before["output"] is not None:
        assert (after["output"] == before["output"]).all()


def test_folder_round_trip_loads_encoder_embeds_and_identical_weights(adapter_folder, bare_pipe, delta_pipe):
    folder, expected = adapter_folder
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "image_encoder",
        "empty_prompt_embeds.safetensors",
    }
    bare_pipe.load_delta_adapter(folder)
    assert bare_pipe.image_encoder is not None and bare_pipe.feature_extractor.size["height"] == 32
    assert bare_pipe.empty_prompt_embeds.shape == (1, 16, 48)
    saved, loaded = delta_pipe.delta_adapter.state_dict(), bare_pipe.delta_adapter.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert (edit(bare_pipe) == expected).all()


def test_subfolder_and_hub_cache_resolution_offline(adapter_folder, bare_pipe, tmp_path):
    """A repo id resolves through a cache laid out as huggingface_hub lays it out, with no network."""
    folder, expected = adapter_folder
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--delta-adapter"
    shutil.copytree(folder, repo / "snapshots" / commit / "weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    bare_pipe.load_delta_adapter("org/delta-adapter", subfolder="weights", cache_dir=tmp_path / "hub")
    assert (edit(bare_pipe) == expected).all()


def test_unload_restores_the_base_output_bit_for_bit(bare_pipe, adapter_folder):
    folder, _ = adapter_folder
    original_processors = dict(bare_pipe.transformer.attn_processors)
    bare_pipe.register_modules(image_encoder=None)
    bare_pipe.load_delta_adapter(folder)
    base = render(bare_pipe, exemplar=(SOURCE, TARGET), delta_scale=0.0)
    assert not (edit(bare_pipe) == base).all()
    bare_pipe.unload_delta_adapter()
    assert bare_pipe.transformer.attn_processors == original_processors
    assert (
        bare_pipe.delta_adapter is None and bare_pipe.image_encoder is None and bare_pipe.empty_prompt_embeds is None
    )
    unloaded = (
        FluxDeltaEditPipeline.__mro__[2]
        .__call__(
            bare_pipe,
            image=QUERY,
            prompt="",
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **TEXT_KWARGS,
        )
        .images
    )
    assert (unloaded == base).all()


def test_set_scale_per_block_and_globally(adapter_folder, bare_pipe):
    folder, expected = adapter_folder
    bare_pipe.load_delta_adapter(folder)
    bare_pipe.set_delta_adapter_scale({"double": [0.0], "single": [0.0, 0.0]})
    base = edit(bare_pipe)
    assert (base == render(bare_pipe, exemplar=(SOURCE, TARGET), delta_scale=0.0)).all()
    bare_pipe.set_delta_adapter_scale({"single": [1.0, 0.5]})
    assert [p.scale for p in bare_pipe.delta_processors.values()] == [0.0, 1.0, 0.5]
    bare_pipe.set_delta_adapter_scale(1.0)
    assert (edit(bare_pipe) == expected).all()
    with pytest.raises(ValueError, match="1 single-block scales given, but the transformer has 2"):
        bare_pipe.set_delta_adapter_scale({"single": [1.0]})
    with pytest.raises(ValueError, match="'double' and/or 'single'"):
        bare_pipe.set_delta_adapter_scale({"all": [1.0]})
    assert [p.scale for p in bare_pipe.delta_processors.values()] == [1.0, 1.0, 1.0]  # a refused call sets nothing


def test_loading_twice_replaces_and_unload_still_restores(adapter_folder, bare_pipe):
    folder, expected = adapter_folder
    original = dict(bare_pipe.transformer.attn_processors)
    bare_pipe.load_delta_adapter(folder)
    bare_pipe.load_delta_adapter(folder)
    assert (edit(bare_pipe) == expected).all()
    bare_pipe.unload_delta_adapter()
    assert bare_pipe.transformer.attn_processors == original


def _write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _corrupt(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _pickled_only(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    weights.unlink()


def _missing_weights(folder):
    (folder / "diffusion_pytorch_model.safetensors").unlink()


def _corrupt_embeds(folder):
    (folder / "empty_prompt_embeds.safetensors").write_bytes(b"not safetensors")


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (_corrupt, ValueError, "corrupt or not a safetensors file.*force_download"),
        (_pickled_only, ValueError, "only safetensors"),
        (_missing_weights, OSError, "No Delta-Adapter at.*no diffusion_pytorch_model.safetensors"),
        (
            lambda f: _write_config(f, num_single_blocks=3),
            ValueError,
            "another backbone.*num_single_blocks: adapter has 3",
        ),
        (lambda f: _write_config(f, transformer_inner_dim=64), ValueError, "another backbone.*transformer_inner_dim"),
        (lambda f: _write_config(f, resampler_dim=24), ValueError, "do not match its config.*resampler.latents"),
        (_corrupt_embeds, ValueError, "empty_prompt_embeds.safetensors.*corrupt"),
    ],
    ids=["corrupt", "pickle", "missing", "block-count", "inner-dim", "config-vs-weights", "bad-embeds"],
)
def test_failed_load_raises_and_changes_nothing(adapter_folder, delta_pipe, damage, error, message):
    folder, _ = adapter_folder
    damage(folder)
    before = snapshot(delta_pipe)
    with pytest.raises(error, match=message):
        delta_pipe.load_delta_adapter(folder)
    assert_unchanged(delta_pipe, before)


def test_failed_load_into_a_bare_pipeline_changes_nothing(adapter_folder, bare_pipe, tmp_path):
    folder, _ = adapter_folder
    before = snapshot(bare_pipe)
    with pytest.raises(OSError, match="No folder .*nowhere"):
        bare_pipe.load_delta_adapter(tmp_path / "nowhere", image_encoder_folder=str(folder / "image_encoder"))
    with pytest.raises(OSError, match="image encoder"):
        bare_pipe.load_delta_adapter(folder, image_encoder_folder="missing_encoder")
    with pytest.raises(ValueError, match="no image encoder"):
        bare_pipe.load_delta_adapter(folder, image_encoder_folder=None)
    assert_unchanged(bare_pipe, before)


def test_state_dict_loading_is_strict(delta_pipe):
    before = snapshot(delta_pipe)
    state_dict = dict(delta_pipe.delta_adapter.state_dict())
    adapter_config = dict(delta_pipe.delta_adapter.config)
    state_dict.pop("refiner.gate")
    with pytest.raises(ValueError, match="do not match its config: missing 1 tensors \\(refiner.gate\\)"):
        delta_pipe.load_delta_adapter(state_dict, adapter_config=adapter_config)
    with pytest.raises(TypeError, match="unexpected arguments"):
        delta_pipe.load_delta_adapter(state_dict, adapter_name="x")
    with pytest.raises(ValueError, match="only safetensors"):
        delta_pipe.load_delta_adapter(state_dict, weight_name="x.bin")
    assert_unchanged(delta_pipe, before)


def test_adapter_for_another_backbone_given_as_model_config(delta_pipe):
    other = DeltaAdapterModel.config_for_transformer(
        delta_pipe.transformer,
        32,
        num_edit_tokens=4,
        resampler_dim=16,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=8,
    )
    other["num_double_blocks"] = 2
    adapter = DeltaAdapterModel.from_config(other)
    with pytest.raises(ValueError, match="num_double_blocks: adapter has 2, backbone has 1"):
        delta_pipe.load_delta_adapter(adapter.state_dict(), adapter_config=other)


def test_processors_keep_the_chosen_attention_backend(delta_pipe):
    delta_pipe.unload_delta_adapter()
    for processor in delta_pipe.transformer.attn_processors.values():
        processor._attention_backend = "native"
    adapter = tiny_adapter(delta_pipe.transformer)

    delta_pipe.register_modules(image_encoder=tiny_image_encoder())
    delta_pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    processors = delta_pipe.delta_processors
    assert len(processors) == 3 and isinstance(
        processors["transformer_blocks.0.attn.processor"], Flux2DeltaAttnProcessor
    )
    assert all(p._attention_backend == "native" for p in processors.values())
