"""The real-size cost scripts check their arguments by the training script's rules before counting anything."""

import re
import sys
from pathlib import Path

import pytest


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
