"""The real-size cost scripts check their arguments by the training script's rules before counting anything, and
the GPU check runs its whole code on tiny models on the CPU."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch


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
