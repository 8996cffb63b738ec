import re

import pytest
from huggingface_hub.errors import OfflineModeIsEnabled

from diffusers_delta import compute_empty_prompt_embeds
from diffusers_delta.hub import EXAMPLE_FILES, push_folder, render_model_card
from diffusers_delta.testing import TEXT_KWARGS, randomize_, tiny_adapter, tiny_transformer


def _python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_card_metadata_and_a_snippet_naming_the_repo():
    adapter = tiny_adapter(tiny_transformer())
    card = render_model_card(
        adapter,
        repo_id="org/delta-adapter",
        base_model="black-forest-labs/FLUX.2-klein-4B",
        image_encoder="google/siglip-so400m-patch14-384",
        datasets=["org/pairs"],
        training={"steps": 100},
        validation_grid="validation.png",
        example_files=True,
        tags=["recolor"],
    )
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "image-to-image"
    assert data["base_model"] == "black-forest-labs/FLUX.2-klein-4B" and data["license"] == "apache-2.0"
    assert data["datasets"] == ["org/pairs"] and {"delta-adapter", "flux2", "recolor"} <= set(data["tags"])
    snippet = _python_block(card.text)
    assert 'pipe.load_delta_adapter("org/delta-adapter")' in snippet
    assert all(name in snippet for name in EXAMPLE_FILES) and 'hf_hub_download("org/delta-adapter"' in snippet
    compile(snippet, "card-snippet", "exec")  # runs as written: at least it is valid Python
    assert "| steps | 100 |" in card.text and 'src="validation.png"' in card.text
    assert "adapted at test time" not in card.text


def test_card_without_examples_or_grid_and_for_an_adapted_adapter():
    card = render_model_card(
        tiny_adapter(tiny_transformer()),
        repo_id="me/adapted",
        base_model="b",
        image_encoder="e",
        adaptation={"base_adapter": "org/delta-adapter", "num_steps": 20, "learning_rate": 1e-4, "lambda_delta": 1.0},
    )
    compile(_python_block(card.text), "card-snippet", "exec")
    assert "<img" not in card.text and "hf_hub_download" not in card.text
    assert "adapted at test time" in card.text and re.search(r"`org/delta-adapter`:\s+20 steps", card.text)


def test_save_delta_adapter_writes_the_card(delta_pipe, tmp_path):
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    card = render_model_card(delta_pipe.delta_adapter, repo_id="org/a", base_model="b", image_encoder="e")
    delta_pipe.save_delta_adapter(tmp_path, model_card=card)
    assert (tmp_path / "README.md").read_text().startswith("---\nbase_model: b\n")


def test_push_goes_through_huggingface_hub(tmp_path):
    with pytest.raises(OfflineModeIsEnabled):  # the tests run with HF_HUB_OFFLINE=1
        push_folder(tmp_path, "org/delta-adapter", token="hf_x")
