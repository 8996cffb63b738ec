"""examples/train_delta_adapter.py on tiny models saved to folders: launched as users launch it, and in-process
where a test must reach inside (a crash at a chosen step, a non-finite loss)."""

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxKontextPipeline
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import SiglipImageProcessorPil

from diffusers_delta import FluxDeltaEditPipeline, FluxKontextDeltaEditPipeline
from diffusers_delta.testing import (
    TEXT_KWARGS,
    free_port,
    random_image,
    tiny_image_encoder,
    tiny_klein_components,
    tiny_kontext_components,
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_delta_adapter  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny FLUX.2 [klein] folder, a tiny FLUX.1 Kontext folder, a tiny SigLIP folder, and training pairs in each
    supported layout."""
    root = tmp_path_factory.mktemp("training")
    components = tiny_klein_components()
    Flux2KleinPipeline(**components).save_pretrained(root / "base")
    FluxKontextPipeline(**tiny_kontext_components()).save_pretrained(root / "kontext")
    tiny_image_encoder().save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    for folder in ("source", "target"):
        (root / "pairs" / folder).mkdir(parents=True)
    for i in range(5):
        random_image(i).save(root / "pairs" / "source" / f"{i}.png")
        random_image(100 + i).save(root / "pairs" / "target" / f"{i}.png")
    (root / "pairs" / "source" / "9-broken.png").write_bytes(b"not an image")
    random_image(9).save(root / "pairs" / "target" / "9-broken.png")
    (root / "side_by_side" / "task").mkdir(parents=True)
    for i in range(4):
        joined = np.concatenate([np.asarray(random_image(i)), np.asarray(random_image(100 + i))], axis=1)
        PIL.Image.fromarray(joined).save(root / "side_by_side" / "task" / f"{i}.png")
    table = datasets.Dataset.from_dict(
        {"before": [random_image(i) for i in range(4)], "after": [random_image(100 + i) for i in range(4)]},
        features=datasets.Features({"before": datasets.Image(), "after": datasets.Image()}),
    )
    (root / "hub_dataset").mkdir()
    table.to_parquet(str(root / "hub_dataset" / "train.parquet"))
    return root


def arguments(folders, output_dir, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(folders / "base"), "--image_encoder", str(folders / "siglip"),
        "--resolution", "64", "--num_edit_tokens", "4", "--resampler_dim", "16", "--resampler_depth", "1",
        "--resampler_heads", "2", "--max_sequence_length", "16", "--text_encoder_out_layers", "1", "2", "3",
        "--output_dir", str(output_dir), "--report_to", "none", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def launch(args: list[str], *launcher: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_machines",
        "1",
        str(EXAMPLES / "train_delta_adapter.py"),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]


def summary(output_dir) -> dict:
    return json.loads((Path(output_dir) / "training_summary.json").read_text())


def adapter_weights(folder) -> dict:
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


def test_launched_run_writes_a_folder_the_pipeline_loads(folders, tmp_path):
    output = tmp_path / "run"
    pair = [str(folders / "pairs" / name / "0.png") for name in ("source", "target", "source")]
    launch(
        arguments(folders, output, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "3",
                  "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--validation_exemplar", *pair,
                  "--validation_steps", "2", "--report_to", "tensorboard"),
        "--num_processes", "1", "--cpu",
    )  # fmt: skip
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (output / "validation.png").is_file() and (output / "examples" / "query.png").is_file()
    assert list((output / "logs").rglob("events.out.tfevents.*"))  # both losses went to tensorboard
    card = ModelCard.load(output / "README.md")  # parses, with the Hub's fields, and no path of this machine
    assert card.data.library_name == "diffusers-delta" and card.data.widget[0]["output"]["url"] == "validation.png"
    assert str(folders) not in card.text and str(tmp_path) not in card.text
    run = summary(output)
    assert run["global_step"] == 3 and run["nonfinite_steps"] == []
    assert all(set(losses) == {"flow_matching", "delta_consistency", "lr"} for losses in run["losses"].values())

    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.load_delta_adapter(output)  # adapter, SigLIP and the empty prompt, from the release folder
    assert pipe.empty_prompt_embeds.shape == (1, 16, 48)
    trained = adapter_weights(output)
    assert any(trained[k].abs().sum() > 0 for k in trained if "to_v_delta" in k)  # it learned something
    query = random_image(7)
    images = pipe(query, exemplar=(random_image(1), random_image(2)), output_type="np", **TEXT_KWARGS).images
    assert images.shape == (1, 64, 64, 3)


def test_edit_token_dim_sets_a_new_adapter_s_width_records_it_and_the_release_edits(folders, tmp_path):
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "2",
                  "--checkpointing_steps", "1", "--edit_token_dim", "8")
    ))  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["edit_token_dim"] == 8
    assert json.loads((tmp_path / "checkpoint-2" / "run_flags.json").read_text())["edit_token_dim"] == 8
    weights = adapter_weights(tmp_path)
    assert weights["double_blocks.0.to_k_delta.weight"].shape[1] == 8  # every block's maps read 8-wide tokens
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.load_delta_adapter(tmp_path)
    assert pipe.encode_exemplar((random_image(1), random_image(2))).shape[-1] == 8
    with pytest.raises(SystemExit):
        train_delta_adapter.parse_args(arguments(folders, tmp_path / "zero", "--train_data_dir", "x",
                                                 "--edit_token_dim", "0"))  # fmt: skip


def test_unreadable_pairs_are_counted(folders, tmp_path):
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "6",
                  "--checkpointing_steps", "100")
    ))  # fmt: skip
    run = summary(tmp_path)
    assert run["skipped_pairs"] == 1  # 9-broken.png, met once in an epoch of 6 pairs
    assert len(run["skipped_examples"]) == 1 and run["skipped_examples"][0].endswith("9-broken.png")
    assert run["skipped_at_load"] == {"outside the root": 0, "missing": 0}


class Crash(Exception):
    pass


def crash_after_checkpoint(folders, output, common, crash_step: int, monkeypatch) -> None:
    """Runs training into `output` and kills it right after the checkpoint of `crash_step` is written."""
    real_save = train_delta_adapter.save_checkpoint

    def save_then_crash(accelerator, args, step, flags):
        real_save(accelerator, args, step, flags)
        if step == crash_step:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(train_delta_adapter, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, output, *common)))


def test_resume_after_a_crash_is_exact(folders, tmp_path, monkeypatch):
    common = ["--train_data_dir", str(folders / "pairs"), "--max_train_steps", "6", "--checkpointing_steps", "2",
              "--gradient_accumulation_steps", "1", "--lr_scheduler", "linear"]  # fmt: skip
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path / "whole", *common)))
    crash_after_checkpoint(folders, tmp_path / "resumed", common, 4, monkeypatch)
    changed = [*common, "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4", "--train_batch_size", "2"]
    with pytest.raises(SystemExit, match=r"other flags \(--train_batch_size .*--learning_rate 0.001 -> 0.0005.*"
                                         r"--pretrained_adapter"):  # fmt: skip
        train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path / "resumed", *changed)))
    (tmp_path / "resumed" / "checkpoint-6.tmp").mkdir()  # a save that was killed half-way
    (tmp_path / "resumed" / "checkpoint-6.tmp" / "optimizer.bin").write_bytes(b"trunc")
    train_delta_adapter.main(
        train_delta_adapter.parse_args(arguments(folders, tmp_path / "resumed", *common, "--resume_from_checkpoint",
                                                 "latest"))
    )  # fmt: skip

    whole, resumed = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    whole_optimizer = torch.load(tmp_path / "whole" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    resumed_optimizer = torch.load(tmp_path / "resumed" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    for index, state in whole_optimizer["state"].items():
        assert all(torch.equal(value, resumed_optimizer["state"][index][key]) for key, value in state.items())
    whole_order, resumed_order = summary(tmp_path / "whole")["data_order"], summary(tmp_path / "resumed")["data_order"]
    assert resumed_order == {step: whole_order[step] for step in ("5", "6")}
    assert not (tmp_path / "resumed" / "checkpoint-6.tmp").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1, got 0: there would be nothing to train"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
    (["--output_dir", "__file__"], "--output_dir .*file.txt is a file: name the folder"),
])  # fmt: skip
def test_runs_that_would_train_nothing_or_cannot_write_are_refused_up_front(folders, tmp_path, capsys, flags, message):
    (tmp_path / "file.txt").write_text("a file")
    flags = [str(tmp_path / "file.txt") if flag == "__file__" else flag for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        train_delta_adapter.parse_args(arguments(folders, tmp_path / "out", "--train_data_dir", str(folders), *flags))
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_skips_the_step(folders, tmp_path, monkeypatch):
    forward = train_delta_adapter.DeltaAdapterObjective.forward
    calls = []

    def sometimes_nan(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_delta_adapter.DeltaAdapterObjective, "forward", sometimes_nan)
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "3",
                  "--checkpointing_steps", "100")
    ))  # fmt: skip
    assert summary(tmp_path)["nonfinite_steps"] == [2] and summary(tmp_path)["global_step"] == 3
    assert all(torch.isfinite(value).all() for value in adapter_weights(tmp_path).values())


def test_hub_dataset_with_cached_latents(folders, tmp_path):
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--dataset_name", str(folders / "hub_dataset"), "--source_column", "before",
                  "--target_column", "after", "--cache_latents", "--max_train_steps", "2", "--checkpointing_steps",
                  "100", "--lambda_delta", "0")
    ))  # fmt: skip
    run = summary(tmp_path)
    assert run["global_step"] == 2 and all(step["delta_consistency"] == 0 for step in run["losses"].values())


def test_cached_latents_kept_in_a_folder_are_read_back_by_a_later_run_and_train_the_same(
    folders, tmp_path, monkeypatch
):
    encodings = []
    encode = train_delta_adapter.cache_encoded_pairs
    monkeypatch.setattr(train_delta_adapter, "cache_encoded_pairs", lambda *a: encodings.append(1) or encode(*a))
    cache = tmp_path / "encoded"

    def train(output, *extra):
        train_delta_adapter.main(train_delta_adapter.parse_args(
            arguments(folders, tmp_path / output, "--train_data_dir", str(folders / "pairs"), "--cache_latents",
                      "--max_train_steps", "2", "--checkpointing_steps", "100", *extra)
        ))  # fmt: skip
        return adapter_weights(tmp_path / output)

    plain = train("plain")
    first = train("first", "--cache_latents_dir", str(cache))
    assert len(encodings) == 2 and (cache / "encoded_pairs.safetensors").is_file()
    second = train("second", "--cache_latents_dir", str(cache))
    assert len(encodings) == 2  # read back, not encoded again
    assert all(torch.equal(plain[name], first[name]) and torch.equal(first[name], second[name]) for name in plain)
    train("third", "--cache_latents_dir", str(cache), "--seed", "1")  # another crop and data order: encoded anew
    assert len(encodings) == 3
    (cache / "encoded_pairs.safetensors").write_bytes(b"damaged")
    train("fourth", "--cache_latents_dir", str(cache), "--seed", "1")  # unreadable: encoded anew
    assert len(encodings) == 4
    with pytest.raises(SystemExit):
        train_delta_adapter.parse_args(arguments(folders, tmp_path, "--cache_latents_dir", str(cache)))


def test_two_processes_keep_identical_weights(folders, tmp_path):
    """ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 (gloo), on Relation252K's layout."""
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        launch(
            arguments(folders, tmp_path, "--side_by_side_data_dir", str(folders / "side_by_side"),
                      "--max_train_steps", "2", "--checkpointing_steps", "100"),
            "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        )  # fmt: skip
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    run = summary(tmp_path)
    assert len(run["rank_fingerprints"]) == 2 and run["ranks_identical"]
    assert run["rank_fingerprints"][0] != pytest.approx([0, 0])


def test_lora_is_saved_in_diffusers_format_and_loaded_with_the_adapter(folders, tmp_path):
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "2",
                  "--checkpointing_steps", "1", "--lora_rank", "2", "--lora_alpha", "8")
    ))  # fmt: skip
    lora = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("transformer.") for key in lora)
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", framework="pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (2, 8)  # scaling 4, not 1
    assert (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()

    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipe(random_image(7), exemplar=(random_image(1), random_image(2)), delta_scale=0.0,
                    generator=generator, output_type="np", **TEXT_KWARGS).images  # fmt: skip

    pipe.load_delta_adapter(tmp_path)
    with_lora = render()
    assert pipe.get_list_adapters() == {"transformer": ["delta_adapter"]}
    assert pipe.transformer.peft_config["delta_adapter"].lora_alpha == 8
    pipe.unload_delta_adapter()
    assert pipe.get_list_adapters() == {}
    pipe.load_delta_adapter(tmp_path, image_encoder_folder=str(tmp_path / "image_encoder"))
    assert (render() == with_lora).all()
    pipe.unload_delta_adapter()
    base = Flux2KleinPipeline.__call__(
        pipe, image=random_image(7), prompt="", num_inference_steps=4, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="np", **TEXT_KWARGS,
    ).images  # fmt: skip
    assert not (base == with_lora).all()  # the LoRA changed the transformer, and unloading removed it


def test_a_failed_release_keeps_the_previous_one_and_the_checkpoints(folders, tmp_path, monkeypatch):
    train = arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--checkpointing_steps", "1")
    train_delta_adapter.main(train_delta_adapter.parse_args([*train, "--max_train_steps", "2"]))
    release = {
        str(path.relative_to(tmp_path)): path.read_bytes()
        for path in tmp_path.rglob("*")
        if path.is_file() and not path.relative_to(tmp_path).parts[0].startswith(("checkpoint-", "logs"))
    }
    assert "diffusion_pytorch_model.safetensors" in release and "README.md" in release

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelCard, "save", disk_full)  # the release's last file
    with pytest.raises(OSError, match="No space left"):
        train_delta_adapter.main(train_delta_adapter.parse_args(
            [*train, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
        ))  # fmt: skip
    assert {name: (tmp_path / name).read_bytes() for name in release} == release  # the step-2 release, whole
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not [p for p in tmp_path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_gradient_checkpointing_covers_siglip(folders, tmp_path, monkeypatch):
    checkpointed = []
    real = train_delta_adapter.enable_image_encoder_checkpointing

    def record(image_encoder):
        real(image_encoder)
        checkpointed.append((type(image_encoder).__name__, image_encoder.is_activation_checkpointing))

    monkeypatch.setattr(train_delta_adapter, "enable_image_encoder_checkpointing", record)
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "1",
                  "--gradient_checkpointing")
    ))  # fmt: skip
    assert checkpointed == [("SiglipVisionModel", True)]
    assert summary(tmp_path)["global_step"] == 1


def test_every_pair_is_used_once_per_epoch_under_accumulation(folders, tmp_path):
    """6 micro-batches an epoch in groups of 4: a group of 4 and a group of 2, never a group across epochs."""
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--num_train_epochs", "2",
                  "--gradient_accumulation_steps", "4", "--checkpointing_steps", "100")
    ))  # fmt: skip
    run = summary(tmp_path)
    assert run["global_step"] == 4 and run["epochs"] == {"1": 0, "2": 0, "3": 1, "4": 1}
    order = run["data_order"]
    for steps in (("1", "2"), ("3", "4")):
        assert [len(order[step]) for step in steps] == [4, 2]
        assert sorted(order[steps[0]] + order[steps[1]]) == list(range(6))  # all six pairs, once each


def test_resume_is_exact_across_an_epoch_boundary_with_accumulation(folders, tmp_path, monkeypatch):
    common = ["--train_data_dir", str(folders / "pairs"), "--max_train_steps", "5", "--checkpointing_steps", "1",
              "--gradient_accumulation_steps", "4", "--lr_scheduler", "linear"]  # fmt: skip
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path / "whole", *common)))
    crash_after_checkpoint(folders, tmp_path / "resumed", common, 2, monkeypatch)  # the first epoch's short group
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    ))  # fmt: skip
    whole, resumed = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    whole_order = summary(tmp_path / "whole")["data_order"]
    assert summary(tmp_path / "resumed")["data_order"] == {step: whole_order[step] for step in ("3", "4", "5")}


def test_a_stream_that_runs_out_starts_a_new_pass(folders, tmp_path):
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path, "--dataset_name", str(folders / "hub_dataset"), "--source_column", "before",
                  "--target_column", "after", "--streaming", "--max_train_steps", "6", "--checkpointing_steps",
                  "100", "--lambda_delta", "0")
    ))  # fmt: skip
    run = summary(tmp_path)
    assert run["global_step"] == 6 and run["epochs"] == {str(step): 0 if step <= 4 else 1 for step in range(1, 7)}


def test_two_processes_accumulate_short_groups_in_step(folders, tmp_path):
    """Per rank 2 micro-batches an epoch in groups of 3: one short group per epoch, reduced by DDP once."""
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        launch(
            arguments(folders, tmp_path, "--side_by_side_data_dir", str(folders / "side_by_side"),
                      "--num_train_epochs", "2", "--gradient_accumulation_steps", "3", "--checkpointing_steps", "100"),
            "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        )  # fmt: skip
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    run = summary(tmp_path)
    assert run["global_step"] == 2 and run["ranks_identical"] and run["epochs"] == {"1": 0, "2": 1}
    assert [len(run["data_order"][step]) for step in ("1", "2")] == [2, 2]


def test_a_second_job_on_the_same_output_dir_is_refused(folders, tmp_path):
    train = arguments(folders, tmp_path, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "1")
    with open(tmp_path / ".training.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the main process of a running job holds
        with pytest.raises(RuntimeError, match="Another training run is writing to .*--output_dir"):
            train_delta_adapter.main(train_delta_adapter.parse_args(train))
        assert [p.name for p in tmp_path.iterdir()] == [".training.lock"]  # nothing written beside it
    train_delta_adapter.main(train_delta_adapter.parse_args(train))  # the folder is free again
    assert summary(tmp_path)["global_step"] == 1
    assert not (tmp_path / ".training.lock").exists()  # a finished run leaves no lock in the released folder


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(folders, tmp_path, monkeypatch):
    common = ["--train_data_dir", str(folders / "pairs"), "--max_train_steps", "3", "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "1"]  # fmt: skip
    real_rmtree = train_delta_adapter.shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if ".deleting-checkpoint-" in str(path):
            (Path(path) / "optimizer.bin").unlink()  # half-deleted when the kill comes
            raise Crash
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(train_delta_adapter.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Crash):
        train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path, *common)))
    monkeypatch.setattr(train_delta_adapter.shutil, "rmtree", real_rmtree)
    assert train_delta_adapter.checkpoint_steps(str(tmp_path)) == [2]  # the half-deleted one is not a checkpoint
    train_delta_adapter.main(
        train_delta_adapter.parse_args(arguments(folders, tmp_path, *common, "--resume_from_checkpoint", "latest"))
    )
    assert summary(tmp_path)["global_step"] == 3 and train_delta_adapter.checkpoint_steps(str(tmp_path)) == [3]


def run_in_process(folders, output, *extra) -> argparse.Namespace:
    args = train_delta_adapter.parse_args(
        arguments(folders, output, "--train_data_dir", str(folders / "pairs"), "--checkpointing_steps", "100", *extra)
    )
    train_delta_adapter.main(args)
    return args


def test_freeze_delta_gate_keeps_every_lambda_at_one(folders, tmp_path):
    run_in_process(folders, tmp_path / "frozen", "--max_train_steps", "2", "--freeze_delta_gate")
    run_in_process(folders, tmp_path / "trained", "--max_train_steps", "2")
    for name, expected_still_one in (("frozen", True), ("trained", False)):
        gates = [v for k, v in adapter_weights(tmp_path / name).items() if k.endswith("delta_gate")]
        assert len(gates) == 3 and all(torch.equal(g, torch.ones(())) for g in gates) == expected_still_one


def test_optimizers_and_the_learning_rate_flags(folders, tmp_path):
    args = run_in_process(folders, tmp_path / "prodigy", "--max_train_steps", "2", "--optimizer", "Prodigy",
                          "--learning_rate", "1.0", "--scale_lr", "--gradient_accumulation_steps", "2")  # fmt: skip
    assert args.learning_rate == 2.0 and summary(tmp_path / "prodigy")["global_step"] == 2
    lrs = {}
    for schedule, extra in (("linear", []), ("polynomial", ["--lr_power", "2"]), ("cosine", []),
                            ("cosine_with_restarts", ["--lr_num_cycles", "2"])):  # fmt: skip
        run_in_process(folders, tmp_path / schedule, "--max_train_steps", "4", "--lr_scheduler", schedule, *extra)
        lrs[schedule] = [step["lr"] for step in summary(tmp_path / schedule)["losses"].values()]
    assert lrs["linear"] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert lrs["polynomial"] == pytest.approx([0.5625e-3, 0.25e-3, 0.0625e-3, 1e-7], abs=1e-7)  # (1 - t)^2
    assert lrs["cosine"][1] == pytest.approx(5e-4) and lrs["cosine_with_restarts"][1] == pytest.approx(
        1e-3
    )  # restarted
    with pytest.raises(ValueError, match="--use_8bit_adam needs a CUDA GPU"):
        run_in_process(folders, tmp_path / "8bit", "--max_train_steps", "1", "--use_8bit_adam")


def test_lora_layers_and_dropout_reach_the_released_lora(folders, tmp_path):
    run_in_process(folders, tmp_path, "--max_train_steps", "1", "--lora_rank", "2", "--lora_layers", "to_q, to_k",
                   "--lora_dropout", "0.1")  # fmt: skip
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", framework="pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
        keys = list(file.keys())
    assert sorted(metadata["transformer.target_modules"]) == ["to_k", "to_q"]
    assert metadata["transformer.lora_dropout"] == 0.1
    assert keys and all(".to_q." in key or ".to_k." in key for key in keys)


def test_hub_publishing_fails_at_the_start_and_never_logs_the_token(folders, tmp_path):
    with pytest.raises(Exception, match="offline mode"):  # the suite runs offline: the repo cannot be created
        run_in_process(folders, tmp_path, "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "org/x")
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "training_summary.json").exists()
    with pytest.raises(SystemExit):
        train_delta_adapter.parse_args(
            arguments(folders, tmp_path, "--train_data_dir", "x", "--report_to", "wandb", "--hub_token", "hf_x")
        )


def test_every_flag_explains_itself():
    parser_actions = []
    real_parse = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parser_actions.extend(self._actions)
        return real_parse(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = capture
    try:
        train_delta_adapter.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y"])
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    assert len(parser_actions) > 70 and [a.dest for a in parser_actions if not a.help] == []


def kontext_arguments(folders, output_dir, *extra) -> list[str]:
    return arguments(folders, output_dir, "--pretrained_model_name_or_path", str(folders / "kontext"), *extra)


def test_a_kontext_base_is_recognised_and_its_release_edits_text_free(folders, tmp_path):
    output = tmp_path / "run"
    pair = [str(folders / "pairs" / name / "0.png") for name in ("source", "target", "source")]
    train_delta_adapter.main(train_delta_adapter.parse_args(  # in-process: the launcher is tested on klein
        kontext_arguments(folders, output, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "2",
                          "--checkpointing_steps", "1", "--lora_rank", "2", "--validation_exemplar", *pair,
                          "--validation_steps", "2", "--validation_inference_steps", "2")
    ))  # fmt: skip
    assert json.loads((output / "config.json").read_text())["backbone"] == "flux1"
    with safe_open(output / "empty_prompt_embeds.safetensors", "pt") as embeds:
        assert set(embeds.keys()) == {"prompt_embeds", "pooled_prompt_embeds"}
    card = ModelCard.load(output / "README.md")
    assert "FluxKontextDeltaEditPipeline.from_pretrained(BASE, text_encoder=None" in card.text
    assert PIL.Image.open(output / "validation.png").size[1] >= 64

    components = tiny_kontext_components()
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        components[name] = None
    pipe = FluxKontextDeltaEditPipeline(**components, image_size=64)
    pipe.load_delta_adapter(output)  # adapter, LoRA, SigLIP and the empty prompt's T5 and CLIP embeddings
    assert pipe._delta_lora_name is not None
    images = pipe(random_image(7), exemplar=(random_image(1), random_image(2)), num_inference_steps=2,
                  output_type="np").images  # fmt: skip
    assert images.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="trained for FLUX.1 .*this pipeline's transformer is FLUX.2"):
        FluxDeltaEditPipeline(**tiny_klein_components()).load_delta_adapter(output)


def test_kontext_training_resumes_exactly_and_two_processes_agree(folders, tmp_path, monkeypatch):
    common = ["--train_data_dir", str(folders / "pairs"), "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--gradient_accumulation_steps", "1"]  # fmt: skip
    train_delta_adapter.main(train_delta_adapter.parse_args(kontext_arguments(folders, tmp_path / "whole", *common)))
    kontext = ["--pretrained_model_name_or_path", str(folders / "kontext")]
    crash_after_checkpoint(folders, tmp_path / "resumed", [*kontext, *common], 2, monkeypatch)
    train_delta_adapter.main(train_delta_adapter.parse_args(
        kontext_arguments(folders, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    ))  # fmt: skip
    whole, resumed = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)

    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        launch(
            kontext_arguments(folders, tmp_path / "two", "--side_by_side_data_dir", str(folders / "side_by_side"),
                              "--max_train_steps", "2", "--checkpointing_steps", "100"),
            "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        )  # fmt: skip
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    assert summary(tmp_path / "two")["ranks_identical"]


def test_the_relation_evaluation_split_is_held_out_of_training(folders, tmp_path, capsys):
    from diffusers_delta.data import relation_split

    relation = tmp_path / "relation"
    for task in ("add_hat", "to_sketch"):
        (relation / task).mkdir(parents=True)
        for index in range(9):
            joined = np.concatenate([np.asarray(random_image(index)), np.asarray(random_image(50 + index))], axis=1)
            PIL.Image.fromarray(joined).save(relation / task / f"{index}.png")
    args = train_delta_adapter.parse_args(arguments(
        folders, tmp_path / "run", "--side_by_side_data_dir", str(relation), "--hold_out_relation_evaluation",
        "--max_train_pairs", "5",
    ))  # fmt: skip
    files = train_delta_adapter.side_by_side_training_files(args)
    split = relation_split(relation, seed=0)
    held = {path for exemplar, queries in split.evaluation.values() for path in (exemplar, *queries)}
    assert len(files) == 5 and set(files) <= set(split.train) and not set(files) & held
    for flags, message in (
        (["--train_data_dir", str(folders / "pairs"), "--max_train_pairs", "5"], "split a --side_by_side_data_dir"),
        (["--side_by_side_data_dir", str(relation), "--max_train_pairs", "5"], "add --hold_out_relation_evaluation"),
    ):
        with pytest.raises(SystemExit):
            train_delta_adapter.parse_args(arguments(folders, tmp_path / "run", *flags))
        assert message in capsys.readouterr().err


def test_the_papers_recipe_in_the_docs_parses_and_its_accelerate_config_loads(tmp_path):
    import shlex

    from accelerate.commands.config.config_args import load_config_from_file

    readme = (EXAMPLES.parent / "docs" / "paper.md").read_text()
    recipe = readme.split("## The seen-task run, on 4 GPUs", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    launch_line = recipe.split("\npython ", 1)[0].replace("\\\n", " ")
    words = shlex.split(launch_line)
    config = load_config_from_file(str(EXAMPLES.parent / words[words.index("--config_file") + 1]))
    assert config.num_processes == 4 and config.mixed_precision == "bf16" and config.distributed_type == "MULTI_GPU"
    flags = words[words.index("examples/train_delta_adapter.py") + 1 :]
    args = train_delta_adapter.parse_args(flags)  # every flag of the recipe exists and goes with the others
    assert (args.train_batch_size, args.max_train_steps, args.max_train_pairs) == (16, 100_000, 16_000)
    assert args.hold_out_relation_evaluation and args.freeze_delta_gate and args.lambda_delta == 1
    # the full model's variant: the same command with the paper's three sources in place of the Relation subset
    blocks = [block.split("```")[0] for block in readme.split("```bash\n")[1:]]
    snippet = next(block for block in blocks if block.lstrip().startswith("--data_mix"))
    mix = shlex.split(snippet.replace("\\\n", " "))
    seen_only = {"--side_by_side_data_dir": 2, "--max_train_pairs": 2, "--hold_out_relation_evaluation": 1}
    kept = list(flags)
    for flag, width in seen_only.items():
        del kept[kept.index(flag) : kept.index(flag) + width]
    full = train_delta_adapter.parse_args(kept + mix)
    assert [kind for kind, _, _ in full.data_mix_sources] == ["side_by_side", "pico_banana", "nhr_edit"]
    assert full.hold_out_relation_evaluation and full.max_train_pairs is None


def test_a_data_mix_trains_from_several_sources(folders, tmp_path):
    assert train_delta_adapter.parse_mix_source("side_by_side:/data/a:b/relation:2.5") == (
        "side_by_side", "/data/a:b/relation", 2.5,
    )  # fmt: skip
    assert train_delta_adapter.parse_mix_source("folder:pairs") == ("folder", "pairs", 1.0)
    for spec in ("zip:pairs", "folder:pairs:0", "folder:", "folder:pairs:inf", "folder:pairs:1e400", "folder:a:nan",
                 "folder:pairs:-2"):  # fmt: skip
        with pytest.raises(ValueError, match="--data_mix"):
            train_delta_adapter.parse_mix_source(spec)
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(
        folders, tmp_path, "--data_mix", f"folder:{folders / 'pairs'}:1", f"side_by_side:{folders / 'side_by_side'}:2",
        "--max_train_steps", "2", "--checkpointing_steps", "100",
    )))  # fmt: skip
    run = summary(tmp_path)
    assert run["global_step"] == 2 and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()


def test_the_papers_three_sources_train_in_one_mix(folders, tmp_path):
    from test_data import nhr_edit_fixture, pico_banana_fixture

    pico, nhr = pico_banana_fixture(tmp_path / "pico"), nhr_edit_fixture(tmp_path / "nhr-edit")
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(
        folders, tmp_path / "run", "--data_mix", f"pico_banana:{pico / 'sft.jsonl'}:1", f"nhr_edit:{nhr}:1",
        f"side_by_side:{folders / 'side_by_side'}:1", "--max_train_steps", "3", "--checkpointing_steps", "100",
    )))  # fmt: skip
    run = summary(tmp_path / "run")
    assert run["global_step"] == 3  # Pico records without a local source, an NHR edit never downloaded: passed over


def test_hub_streams_mix_by_weight(folders, tmp_path):
    mix = ["--data_mix", f"hub:{folders / 'hub_dataset'}:1", f"hub:{folders / 'hub_dataset'}:3", "--source_column",
           "before", "--target_column", "after", "--streaming", "--max_train_steps", "2",
           "--lambda_delta", "0"]  # fmt: skip
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path / "run", *mix)))
    assert summary(tmp_path / "run")["global_step"] == 2  # the draws' determinism: test_data's MixedStream test
    with pytest.raises(SystemExit):  # a stream mixes Hub datasets only
        train_delta_adapter.parse_args(arguments(folders, tmp_path, "--data_mix", f"folder:{folders / 'pairs'}",
                                                 "--streaming", "--max_train_steps", "2"))  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["flux3", "flux3-distilled"])
def flux3_base(request, tmp_path_factory):
    """A tiny FLUX.3 base as upstream's modular pipeline saves it (`modular_model_index.json`, no scheduler folder),
    and the empty prompt's embeddings (Qwen3-VL's stand-in) in a file."""
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from safetensors.torch import save_file

    from diffusers_delta.testing import tiny_flux3_transformer, tiny_vae

    root = tmp_path_factory.mktemp("flux3_base")
    blocks = (Flux3DistilledAutoBlocks if request.param else Flux3AutoBlocks)()
    upstream = blocks.init_pipeline(None)
    upstream.update_components(transformer=tiny_flux3_transformer(flow_map=request.param), vae=tiny_vae())
    upstream.save_pretrained(str(root / "base"), overwrite_modular_index=True)
    width = upstream.transformer.config.joint_attention_dim
    save_file({"prompt_embeds": torch.randn(1, 8, width, generator=torch.Generator().manual_seed(0))},
              root / "empty_prompt_embeds.safetensors")  # fmt: skip
    return root, request.param


def test_a_flux3_base_trains_releases_an_adapter_that_edits_text_free_and_resumes_exactly(
    folders, flux3_base, tmp_path, monkeypatch
):
    from diffusers_delta.modular import Flux3DeltaModularPipeline, Flux3DistilledDeltaModularPipeline

    root, distilled = flux3_base
    flux3 = ["--pretrained_model_name_or_path", str(root / "base"),
             "--empty_prompt_embeds", str(root / "empty_prompt_embeds.safetensors")]  # fmt: skip
    pair = [str(folders / "pairs" / name / "0.png") for name in ("source", "target", "source")]
    common = [*flux3, "--train_data_dir", str(folders / "pairs"), "--max_train_steps", "4", "--checkpointing_steps",
              "2", "--validation_exemplar", *pair, "--validation_steps", "4", "--validation_inference_steps", "2",
              "--num_validation_images", "2"]
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(folders, tmp_path / "whole", *common)))
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["backbone"] == "flux3"
    assert PIL.Image.open(tmp_path / "whole" / "validation.png").size[1] >= 64  # edited by the modular pipeline
    card = ModelCard.load(tmp_path / "whole" / "README.md").text
    assert "Flux3DeltaModularPipeline" in card

    pipeline_class = Flux3DistilledDeltaModularPipeline if distilled else Flux3DeltaModularPipeline
    pipe = pipeline_class.from_pretrained(root / "base")
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(tmp_path / "whole")  # adapter, SigLIP and the empty prompt: no text encoder
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        return pipe(image=random_image(7), exemplar=(random_image(1), random_image(2)), num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt", output="images", **kwargs)

    edited, base = run(), run(delta_scale=0.0)
    assert edited.shape == base.shape and not torch.equal(edited, base)

    crash_after_checkpoint(folders, tmp_path / "resumed", common, 2, monkeypatch)
    train_delta_adapter.main(train_delta_adapter.parse_args(
        arguments(folders, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    ))  # fmt: skip
    whole, resumed = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)

    with pytest.raises(ValueError, match="--lora_rank: .* not yet on FLUX.3"):
        train_delta_adapter.main(train_delta_adapter.parse_args(
            arguments(folders, tmp_path / "lora", *common, "--lora_rank", "2")
        ))  # fmt: skip


def test_a_flux3_run_without_empty_prompt_embeds_computes_them_with_the_base_s_qwen3_vl(folders, tmp_path):
    pytest.importorskip("torchvision", reason="transformers builds Qwen3-VL's processor only beside torchvision")
    from diffusers.modular_pipelines import Flux3AutoBlocks

    from diffusers_delta.backbones import flux3
    from diffusers_delta.testing import tiny_flux3_transformer, tiny_qwen3_vl_components, tiny_vae

    text = tiny_qwen3_vl_components()
    upstream = Flux3AutoBlocks().init_pipeline(None)
    upstream.update_components(transformer=tiny_flux3_transformer(), vae=tiny_vae(), **text)
    upstream.save_pretrained(str(tmp_path / "base"), overwrite_modular_index=True)
    train_delta_adapter.main(train_delta_adapter.parse_args(arguments(
        folders, tmp_path / "run", "--pretrained_model_name_or_path", str(tmp_path / "base"), "--train_data_dir",
        str(folders / "pairs"), "--max_train_steps", "1",
    )))  # fmt: skip
    stored = load_file(tmp_path / "run" / "empty_prompt_embeds.safetensors")
    upstream.text_encoder, upstream.tokenizer = text["text_encoder"], text["tokenizer"]
    expected = flux3.encode_prompt(upstream, "", 16, (1, 2, 3))  # the script's --max_sequence_length and layers
    assert stored.keys() == {"prompt_embeds"} and torch.equal(stored["prompt_embeds"], expected["prompt_embeds"])
