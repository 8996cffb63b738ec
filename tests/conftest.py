"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_delta.testing import save_tiny_toy_model, tiny_delta_pipeline  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture
def delta_pipe():
    """A tiny `FluxDeltaEditPipeline` with its text encoder, a SigLIP encoder and a fresh adapter loaded."""
    return tiny_delta_pipeline()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A model folder laid out like the embedded toy model, from tiny models (`save_tiny_toy_model`): `base/` (a
    text-free 64x64-only pipeline) and `adapter/` (weights, SigLIP, empty prompt)."""
    root = tmp_path_factory.mktemp("toy_model")
    save_tiny_toy_model(root)
    return root


@pytest.fixture
def run_cli(capsys):
    """Runs `diffusers-delta` with arguments (any objects, as strings); -> (exit code, stdout, stderr)."""
    from diffusers_delta import cli

    def run(argv) -> tuple[int, str, str]:
        try:
            cli.main([str(arg) for arg in argv])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
