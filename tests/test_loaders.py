import json
import os
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import Flux2KleinPipeline
from huggingface_hub import constants as hub_constants
from peft import LoraConfig

from diffusers_delta import (
    DeltaAdapterModel,
    Flux2DeltaAttnProcessor,
    FluxDeltaEditPipeline,
    compute_empty_prompt_embeds,
)
from diffusers_delta.backbones import adapter_config_for
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
        "loras": sorted(getattr(pipe.transformer, "peft_config", None) or {}),
        "output": render(pipe, exemplar=(SOURCE, TARGET)) if pipe.delta_adapter is not None else None,
    }


def assert_unchanged(pipe, before):
    after = snapshot(pipe)
    assert after["processors"] == before["processors"]  # the very same processor objects
    assert after["components"].keys() == before["components"].keys()
    assert all(after["components"][k] is v for k, v in before["components"].items())
    assert after["embeds"] is before["embeds"]
    assert after["loras"] == before["loras"]
    if before["output"] is not None:
        assert (after["output"] == before["output"]).all()


def test_folder_round_trip_loads_encoder_embeds_and_identical_weights(adapter_folder, bare_pipe, delta_pipe):
    folder, expected = adapter_folder
    assert {p.name for p in folder.iterdir()} == {
        "README.md",
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
    repo = tmp_path / "hub" / "models--org--my-delta-adapter"
    shutil.copytree(folder, repo / "snapshots" / commit / "weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    bare_pipe.load_delta_adapter("org/my-delta-adapter", subfolder="weights", cache_dir=tmp_path / "hub")
    assert (edit(bare_pipe) == expected).all()


def test_unload_gives_back_the_pipelines_own_empty_prompt(bare_pipe, adapter_folder):
    """A text-free base folder carries its own empty prompt (as the toy world's does): an adapter that brings
    another replaces it while loaded, and unloading gives the pipeline's own back, not none."""
    folder, _ = adapter_folder
    own = torch.randn_like(safetensors.torch.load_file(folder / "empty_prompt_embeds.safetensors")["prompt_embeds"])
    bare_pipe.empty_prompt_embeds = own
    bare_pipe.load_delta_adapter(folder)
    assert not torch.equal(bare_pipe.empty_prompt_embeds, own)
    bare_pipe.load_delta_adapter(folder)  # a second load keeps what the pipeline had before the first
    bare_pipe.unload_delta_adapter()
    assert bare_pipe.empty_prompt_embeds is own


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
    unloaded = Flux2KleinPipeline.__call__(
        bare_pipe,
        image=QUERY,
        prompt="",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **TEXT_KWARGS,
    ).images
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


def assert_damage_is_refused(pipe, folder, damage, error, message):
    """Damages an adapter folder; loading it must raise `error` matching `message` and change nothing."""
    damage(folder)
    before = snapshot(pipe)
    with pytest.raises(error, match=message):
        pipe.load_delta_adapter(folder)
    assert_unchanged(pipe, before)


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


def _drop_a_tensor(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors.pop("double_blocks.0.to_k_delta.weight")
    safetensors.torch.save_file(tensors, weights)


def _nan_weights(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["refiner.proj.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, weights)


def _nan_embeds(folder):
    path = folder / "empty_prompt_embeds.safetensors"
    embeds = safetensors.torch.load_file(path)["prompt_embeds"]
    safetensors.torch.save_file({"prompt_embeds": embeds * float("nan")}, path)


def _embeds_of_another_width(folder):
    safetensors.torch.save_file({"prompt_embeds": torch.zeros(1, 16, 7)}, folder / "empty_prompt_embeds.safetensors")


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
        (_drop_a_tensor, ValueError, r"missing 1 tensors \(double_blocks.0.to_k_delta.weight\)"),
        (_nan_weights, ValueError, "NaN or infinite values \\(in refiner.proj.weight\\)"),
        (_nan_embeds, ValueError, "empty_prompt_embeds.safetensors holds NaN"),
        (_embeds_of_another_width, ValueError, r"shape \(1, 16, 7\), expected shape \(1, L, 48\)"),
        (lambda f: (f / "config.json").write_text("{not json"), ValueError, "not a readable JSON config"),
        (lambda f: _write_config(f, _class_name="UNet2DModel"), ValueError, "not a Delta-Adapter config"),
        (lambda f: _write_config(f, num_edit_tokens="many"), ValueError, "num_edit_tokens must be a positive integer"),
    ],
    ids=[
        "corrupt",
        "pickle",
        "missing",
        "block-count",
        "inner-dim",
        "config-vs-weights",
        "bad-embeds",
        "missing-tensor",
        "nan-weights",
        "nan-embeds",
        "embeds-width",
        "bad-json",
        "other-class",
        "bad-value",
    ],
)
def test_failed_load_raises_and_changes_nothing(adapter_folder, delta_pipe, damage, error, message):
    assert_damage_is_refused(delta_pipe, adapter_folder[0], damage, error, message)


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
    with pytest.raises(ValueError, match="weight_name= and subfolder= name files of a folder or repo"):
        delta_pipe.load_delta_adapter(state_dict, weight_name="x.safetensors")
    assert_unchanged(delta_pipe, before)


def test_adapter_for_another_backbone_given_as_model_config(delta_pipe):
    other = adapter_config_for(
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


def _save_with_lora(pipe, folder, alpha=8):
    pipe.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_q"]), adapter_name="x"
    )
    loaded, pipe._delta_lora_name = pipe._delta_lora_name, "x"
    for name, parameter in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    pipe.save_delta_adapter(folder)
    pipe.delete_adapters("x")
    pipe._delta_lora_name = loaded


def _lora_for_a_missing_layer(folder):
    lora = safetensors.torch.load_file(folder / "pytorch_lora_weights.safetensors")
    lora = {key.replace("attn.to_q", "attn.to_nowhere"): value for key, value in lora.items()}
    safetensors.torch.save_file(lora, folder / "pytorch_lora_weights.safetensors")


def _lora_with_only_a_halves(folder):  # passes the shape checks; peft itself fails on it
    lora = safetensors.torch.load_file(folder / "pytorch_lora_weights.safetensors")
    safetensors.torch.save_file(
        {k: v for k, v in lora.items() if "lora_A" in k}, folder / "pytorch_lora_weights.safetensors"
    )


def _lora_of_the_wrong_width(folder):
    lora = safetensors.torch.load_file(folder / "pytorch_lora_weights.safetensors")
    lora = {key: value[:, :-1].contiguous() if "lora_A" in key else value for key, value in lora.items()}
    safetensors.torch.save_file(lora, folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_lora_for_a_missing_layer, "LoRA of .* does not fit.*no linear layer .*to_nowhere"),
        (_lora_with_only_a_halves, "LoRA .* could not be loaded into this transformer"),
        (_lora_of_the_wrong_width, "LoRA of .* does not fit.*takes 32 inputs"),
    ],
    ids=["missing-layer", "peft-error", "wrong-width"],
)
def test_a_failed_lora_load_keeps_the_loaded_adapter_and_its_lora(
    adapter_folder, bare_pipe, tmp_path, damage, message
):
    folder, _ = adapter_folder
    bare_pipe.load_delta_adapter(folder)
    _save_with_lora(bare_pipe, tmp_path / "good", alpha=8)
    bare_pipe.load_delta_adapter(tmp_path / "good")  # adapter and LoRA in place
    assert bare_pipe._delta_lora_name == "delta_adapter"
    _save_with_lora(bare_pipe, tmp_path / "bad", alpha=4)
    damage(tmp_path / "bad")
    before = snapshot(bare_pipe)
    with pytest.raises(ValueError, match=message):
        bare_pipe.load_delta_adapter(tmp_path / "bad")
    assert_unchanged(bare_pipe, before)
    bare_pipe.unload_delta_adapter()
    assert not getattr(bare_pipe.transformer, "peft_config", None)


def test_a_second_adapter_with_a_lora_replaces_the_first_exactly(adapter_folder, bare_pipe, tmp_path):
    folder, _ = adapter_folder
    bare_pipe.load_delta_adapter(folder)
    _save_with_lora(bare_pipe, tmp_path / "first", alpha=8)
    _save_with_lora(bare_pipe, tmp_path / "second", alpha=2)
    fresh = FluxDeltaEditPipeline(**tiny_klein_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.load_delta_adapter(tmp_path / "second")
    expected = edit(fresh)

    bare_pipe.load_delta_adapter(tmp_path / "first")
    bare_pipe.load_delta_adapter(tmp_path / "second")
    assert list(bare_pipe.transformer.peft_config) == ["delta_adapter_1"]
    assert (edit(bare_pipe) == expected).all()


def test_a_subfolder_is_loaded_from_the_subfolder(adapter_folder, delta_pipe, bare_pipe, tmp_path):
    folder, expected_root = adapter_folder
    randomize_(delta_pipe.delta_adapter, seed=5)
    delta_pipe.save_delta_adapter(folder / "b")  # root holds adapter A, root/b adapter B
    expected_b = edit(delta_pipe)
    assert not (expected_b == expected_root).all()
    bare_pipe.load_delta_adapter(folder, subfolder="b")
    assert (edit(bare_pipe) == expected_b).all()
    with pytest.raises(FileNotFoundError, match="has no subfolder 'c'"):
        bare_pipe.load_delta_adapter(folder, subfolder="c")


def test_the_working_directory_is_never_read_for_the_image_encoder(adapter_folder, bare_pipe, tmp_path, monkeypatch):
    folder, expected = adapter_folder
    decoy = tiny_image_encoder()
    randomize_(decoy, seed=9)
    decoy.save_pretrained(tmp_path / "cwd" / "image_encoder")
    monkeypatch.chdir(tmp_path / "cwd")
    bare_pipe.load_delta_adapter(folder)  # a plain name: the adapter folder's own image_encoder/
    assert (edit(bare_pipe) == expected).all()

    other = FluxDeltaEditPipeline(**tiny_klein_components())
    other.set_progress_bar_config(disable=True)
    other.load_delta_adapter(folder, image_encoder_folder=Path("image_encoder"))  # a Path is a path on disk
    assert torch.equal(
        other.image_encoder.state_dict()[next(iter(decoy.state_dict()))], next(iter(decoy.state_dict().values()))
    )
    other.load_delta_adapter(folder, image_encoder_folder=str(folder / "image_encoder"))  # absolute: also a path
    assert (edit(other) == expected).all()


def test_a_second_adapter_brings_its_own_image_encoder(adapter_folder, bare_pipe, delta_pipe, tmp_path):
    folder, _ = adapter_folder
    bare_pipe.load_delta_adapter(folder)
    randomize_(delta_pipe.image_encoder, seed=4)
    delta_pipe.save_delta_adapter(tmp_path / "other")
    expected = edit(delta_pipe)
    bare_pipe.load_delta_adapter(tmp_path / "other")
    assert (edit(bare_pipe) == expected).all()


def test_a_path_to_a_file_is_refused_with_the_fix(adapter_folder, bare_pipe):
    folder, _ = adapter_folder
    with pytest.raises(ValueError, match="is a file: pass the folder that holds the adapter"):
        bare_pipe.load_delta_adapter(folder / "config.json")
    with pytest.raises(ValueError, match="weight_name= names its weights file"):
        bare_pipe.load_delta_adapter(folder / "diffusion_pytorch_model.safetensors")


def test_weight_name_and_low_cpu_mem_usage(adapter_folder, bare_pipe):
    folder, expected = adapter_folder
    with pytest.raises(ValueError, match="weight_name='adapter.bin': Delta-Adapter loads only safetensors"):
        bare_pipe.load_delta_adapter(folder, weight_name="adapter.bin")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "adapter.safetensors")
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        bare_pipe.load_delta_adapter(folder)
    for low_cpu_mem_usage in (True, False):
        bare_pipe.load_delta_adapter(folder, weight_name="adapter.safetensors", low_cpu_mem_usage=low_cpu_mem_usage)
        assert (edit(bare_pipe) == expected).all()
        assert all(p.device.type == "cpu" for p in bare_pipe.delta_adapter.parameters())


def test_an_unreachable_hub_is_named_as_such(bare_pipe, tmp_path, monkeypatch):
    assert hub_constants.HF_HUB_OFFLINE  # the suite runs offline
    before = snapshot(bare_pipe)
    with pytest.raises(OSError) as error:
        bare_pipe.load_delta_adapter("org/my-delta-adapter", cache_dir=tmp_path)
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "Pass a local folder" in message
    assert "does not appear to have" not in message and "No Delta-Adapter" not in message
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        FluxDeltaEditPipeline.from_pretrained("org/klein", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="No folder './missing', and it is not a Hub repo id"):
        bare_pipe.load_delta_adapter("./missing")
    assert_unchanged(bare_pipe, before)


def test_arguments_that_would_be_ignored_are_refused(adapter_folder, delta_pipe, caplog):
    folder, _ = adapter_folder
    before = snapshot(delta_pipe)
    with pytest.raises(ValueError, match="adapter_config= applies to a state dict"):
        delta_pipe.load_delta_adapter(folder, adapter_config=dict(delta_pipe.delta_adapter.config))
    for source in ("", 42, None):
        with pytest.raises(TypeError, match="takes a Hub repo id, a folder or a state dict"):
            delta_pipe.load_delta_adapter(source)
    with pytest.raises(TypeError, match="Pass the path of a folder to save into"):
        delta_pipe.save_delta_adapter("")
    assert_unchanged(delta_pipe, before)
    delta_pipe.load_delta_adapter(folder, image_encoder_folder="./elsewhere")  # the pipeline's own encoder is used
    assert "image_encoder_folder='./elsewhere' is not used" in caplog.text


def _encoder_missing_a_weight(folder):
    weights = folder / "image_encoder" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors.pop(next(key for key in tensors if "layers.0.mlp.fc1.weight" in key))
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})


def _encoder_truncated(folder):
    weights = folder / "image_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _encoder_not_square(folder):
    config = folder / "image_encoder" / "preprocessor_config.json"
    settings = json.loads(config.read_text())
    settings["size"] = {"height": 32, "width": 48}
    config.write_text(json.dumps(settings))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_encoder_missing_a_weight, "lacks weights .*fc1.weight.*random weights"),
        (_encoder_truncated, "SigLIP image encoder in .* could not be loaded"),
        (_encoder_not_square, "must be square"),
    ],
    ids=["missing-weight", "truncated", "not-square"],
)
def test_a_damaged_image_encoder_is_refused(adapter_folder, bare_pipe, damage, message):
    assert_damage_is_refused(bare_pipe, adapter_folder[0], damage, ValueError, message)


def test_unloading_an_adapter_with_a_lora_leaves_the_transformer_as_it_was(adapter_folder, tmp_path):
    """No peft wrapper stays behind: the state dict's names and weights are the base's, so a pipeline saved after
    unloading loads back with the base's weights (not `to_q` initialised at random)."""
    folder, _ = adapter_folder
    source = FluxDeltaEditPipeline(**tiny_klein_components())
    source.load_delta_adapter(folder)
    _save_with_lora(source, tmp_path / "with_lora")
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    before = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    pipe.load_delta_adapter(tmp_path / "with_lora")
    assert any("lora" in name for name in pipe.transformer.state_dict())
    pipe.unload_delta_adapter()
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = FluxDeltaEditPipeline.from_pretrained(tmp_path / "saved").transformer.state_dict()
    assert reloaded.keys() == before.keys() and all(torch.equal(reloaded[name], before[name]) for name in before)


@pytest.mark.parametrize("dtypes", ["bfloat16", "mixed"])
def test_weights_of_another_float_dtype_load_and_edit_alike_either_way(adapter_folder, bare_pipe, tmp_path, dtypes):
    folder, _ = adapter_folder
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights = safetensors.torch.load_file(other / "diffusion_pytorch_model.safetensors")
    for index, name in enumerate(sorted(weights)):
        if dtypes == "bfloat16" or index % 2:
            weights[name] = weights[name].to(torch.bfloat16 if dtypes == "bfloat16" else torch.float16)
    safetensors.torch.save_file(weights, other / "diffusion_pytorch_model.safetensors")
    outputs = []
    for low_cpu_mem_usage in (True, False):
        bare_pipe.load_delta_adapter(other, low_cpu_mem_usage=low_cpu_mem_usage)
        assert {p.dtype for p in bare_pipe.delta_adapter.parameters()} == {bare_pipe.transformer.dtype}
        outputs.append(edit(bare_pipe))
    assert (outputs[0] == outputs[1]).all()


@pytest.mark.parametrize("field, value", [("num_edit_tokens", 50_000_000), ("resampler_depth", 10_000_000),
                                          ("resampler_dim", 40_000_000)])  # fmt: skip
def test_a_hostile_config_is_refused_at_once_in_bounded_memory(adapter_folder, bare_pipe, field, value):
    import resource
    import time

    folder, _ = adapter_folder
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    before = snapshot(bare_pipe)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{field}|do not match its config"):
        bare_pipe.load_delta_adapter(folder)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # under 200 MiB more
    assert_unchanged(bare_pipe, before)


@pytest.mark.parametrize("kwargs", [{"weight_name": "../../x.safetensors"}, {"subfolder": "../other"},
                                    {"weight_name": "/etc/x.safetensors"}])  # fmt: skip
def test_names_that_leave_the_adapter_folder_are_refused(adapter_folder, bare_pipe, tmp_path, kwargs):
    folder, _ = adapter_folder
    inner = tmp_path / "inner" / "adapter"
    shutil.copytree(folder, inner)
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "x.safetensors")  # what ../../ reaches
    before = snapshot(bare_pipe)
    with pytest.raises(ValueError, match=r"(weight_name|subfolder)=.* leaves the adapter's folder"):
        bare_pipe.load_delta_adapter(inner, **kwargs)
    assert_unchanged(bare_pipe, before)


@pytest.mark.parametrize("damage, message", [("dangling", r"is a broken link \(to .*gone.safetensors\)"),
                                             ("folder", "is a folder, not a file")])  # fmt: skip
def test_a_broken_link_or_a_folder_in_place_of_the_weights_is_named(adapter_folder, bare_pipe, damage, message):
    folder, _ = adapter_folder
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    if damage == "dangling":
        weights.symlink_to(folder / "gone.safetensors")
    else:
        weights.mkdir()
    before = snapshot(bare_pipe)
    with pytest.raises(FileNotFoundError, match=message):
        bare_pipe.load_delta_adapter(folder)
    assert_unchanged(bare_pipe, before)


def test_the_documentations_placeholder_id_is_refused_without_asking_the_hub(bare_pipe):
    before = snapshot(bare_pipe)
    with pytest.raises(FileNotFoundError, match="placeholder, not a published adapter.*train_delta_adapter.py"):
        bare_pipe.load_delta_adapter("org/delta-adapter")
    assert_unchanged(bare_pipe, before)


def refused_unchanged(pipe, folder, error: type[Exception], match: str) -> None:
    """Loading `folder` raises `error` matching `match`, and the pipeline stays exactly as it was."""
    before = snapshot(pipe)
    with pytest.raises(error, match=match):
        pipe.load_delta_adapter(folder)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("value", [["flux2"], {"name": "flux2"}, 7])
def test_a_config_whose_backbone_is_not_a_name_is_refused_naming_the_file(adapter_folder, bare_pipe, value):
    folder, _ = adapter_folder
    config = json.loads((folder / "config.json").read_text())
    config["backbone"] = value
    (folder / "config.json").write_text(json.dumps(config))
    refused_unchanged(bare_pipe, folder, ValueError, r"config.json: backbone must be a string \(such as 'flux2'\)")


def test_a_config_nested_too_deep_is_refused_naming_the_file(adapter_folder, bare_pipe):
    folder, _ = adapter_folder
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    too_deep = r"config.json is not a Delta-Adapter config \(its JSON is nested too deep"
    refused_unchanged(bare_pipe, folder, ValueError, too_deep)


def test_a_fifo_in_place_of_the_weights_is_named_as_what_it_is(adapter_folder, bare_pipe):
    folder, _ = adapter_folder
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    refused_unchanged(bare_pipe, folder, FileNotFoundError, r"is not a regular file \(it is a named pipe \(FIFO\)\)")


def test_a_weight_stored_as_integers_is_refused_naming_the_tensor(adapter_folder, bare_pipe):
    folder, _ = adapter_folder
    path = folder / "diffusion_pytorch_model.safetensors"
    weights = safetensors.torch.load_file(path)
    name = sorted(weights)[3]
    weights[name] = weights[name].round().to(torch.int32)
    safetensors.torch.save_file(weights, path)
    integers = rf"are corrupt: {re.escape(name)} \(torch.int32\) is stored as integers"
    refused_unchanged(bare_pipe, folder, ValueError, integers)
