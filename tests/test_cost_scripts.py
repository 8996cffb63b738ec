"""The real-size cost scripts check their arguments by the training script's rules before counting anything, their
memory counter agrees with peaks measured on the CPU, and the GPU check runs its whole code on tiny models on the
CPU."""

import json
import re
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffusers_delta import compute_empty_prompt_embeds
from diffusers_delta.testing import TEXT_KWARGS, tiny_delta_pipeline


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_scale  # noqa: E402
import training_cost  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "7"], "--resolution must be a multiple of 16.*got 7: try 16 or 32"),
        (["--resolution", "100"], "--resolution must be a multiple of 16.*got 100: try 96 or 112"),
        (["--resolution", "0"], "--resolution must be a multiple of 16"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    ],
)
def test_training_cost_refuses_what_the_training_script_refuses(argv, message, capsys):
    with pytest.raises(SystemExit):
        training_cost.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "512", "7"], "--sizes must be a multiple of 16.*got 7"),
        (["--batches", "0"], r"--batches must all be at least 1, got \[0\]"),
        (["--batches", "4", "-3"], r"--batches must all be at least 1"),
    ],
)
def test_real_scale_refuses_sizes_and_batches_before_building_anything(argv, message, capsys):
    with pytest.raises(SystemExit):
        real_scale.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_the_training_scripts_sizes_pass():
    assert training_cost.parse_args(["--resolution", "512"]).resolution == 512
    assert real_scale.parse_args(["--sizes", "512", "1024", "--batches", "1"]).sizes == [512, 1024]


def test_the_gpu_check_runs_on_tiny_models_and_refuses_to_guess_without_a_gpu(tmp_path, capsys):
    import gpu_check

    rows = gpu_check.main(["--tiny", "--rounds", "1", "--out", str(tmp_path / "check.json")])
    assert [(row["backbone"], row["what"]) for row in rows] == [
        (backbone, what)
        for backbone in ("klein-4B", "kontext-dev")
        for what in ("edit (2 steps)", "adaptation step", "training step, batch 2, checkpointing")
    ]
    assert all(row["seconds"] > 0 and row["tflop"] > 0 and row["utilisation"] > 0 for row in rows)
    assert json.loads((tmp_path / "check.json").read_text()) == rows
    assert "training step" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])
        assert "No CUDA device here" in capsys.readouterr().err


def measured_peak(step) -> int:
    """The most bytes of CPU tensors `step` holds at once beyond what existed before it, from the allocator's own
    allocation and release events (the profiler's memory events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("checkpointing", ["none", "image", "all"])
def test_the_memory_counter_on_meta_agrees_with_the_peak_measured_on_the_cpu(checkpointing):
    """What `real_scale` counts on `meta` (recomputation inside checkpointed regions included) against what the same
    training step holds on the CPU, within 10%."""
    cpu, meta = (tiny_delta_pipeline(adapter_std=0.05) for _ in range(2))  # seeded: the same models
    for pipe in (cpu, meta):
        pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    for model in (meta.transformer, meta.vae, meta.image_encoder, meta.delta_adapter):
        model.to("meta")
    meta.empty_prompt_embeds = meta.empty_prompt_embeds.to("meta")
    image = PIL.Image.new("RGB", (64, 64))
    peaks = {}
    for name, pipe in (("counted", meta), ("measured", cpu)):
        pair = pipe._encode_pair_for_training(image, image, pipe.transformer.device)
        objective = real_scale.objective_for(pipe, frozen=True, checkpointing=checkpointing)
        step = real_scale.training_step(objective, pair, batch_size=4)
        if name == "counted":
            with real_scale.flash_attention("cpu"):  # the attention kernel the CPU run picks
                peaks[name] = real_scale.peak_memory(step)
        else:
            peaks[name] = measured_peak(step)
    assert peaks["measured"] > 1e6
    assert abs(peaks["counted"] - peaks["measured"]) <= 0.1 * peaks["measured"], peaks
