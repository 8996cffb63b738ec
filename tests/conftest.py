"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_delta import FluxDeltaEditPipeline  # noqa: E402
from diffusers_delta.testing import tiny_adapter, tiny_image_encoder, tiny_klein_components  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture
def delta_pipe():
    """A tiny `FluxDeltaEditPipeline` with its text encoder, a SigLIP encoder and a fresh adapter loaded."""
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.register_modules(image_encoder=tiny_image_encoder())
    adapter = tiny_adapter(pipe.transformer)
    pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe
