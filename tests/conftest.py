"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_delta.testing import tiny_delta_pipeline  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture
def delta_pipe():
    """A tiny `FluxDeltaEditPipeline` with its text encoder, a SigLIP encoder and a fresh adapter loaded."""
    return tiny_delta_pipeline()
