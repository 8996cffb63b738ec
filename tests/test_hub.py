import re

import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

from diffusers_delta import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.hub import EXAMPLE_FILES, push_folder, render_model_card
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_adapter, tiny_transformer


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
    assert data["library_name"] == "diffusers-delta" and data["pipeline_tag"] == "image-to-image"
    assert data["base_model"] == "black-forest-labs/FLUX.2-klein-4B" and data["license"] == "apache-2.0"
    assert data["base_model_relation"] == "adapter" and data["widget"][0]["output"]["url"] == "validation.png"
    assert data["datasets"] == ["org/pairs"] and {"delta-adapter", "flux2", "recolor"} <= set(data["tags"])
    snippet = _python_block(card.text)
    assert 'ADAPTER = "org/delta-adapter"' in snippet and "pipe.load_delta_adapter(ADAPTER)" in snippet
    assert all(name in snippet for name in EXAMPLE_FILES) and "hf_hub_download(ADAPTER, name)" in snippet
    assert snippet.startswith("# pip install diffusers-delta\n")
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


@pytest.mark.parametrize(
    "base_model, license_fields",
    [
        ("black-forest-labs/FLUX.2-klein-4B", {"license": "apache-2.0"}),
        ("black-forest-labs/FLUX.2-klein-9B", {"license": "other", "license_name": "flux-non-commercial-license"}),
        ("someone/other-base", {"license": "other"}),
    ],
)
def test_the_licence_follows_the_base_model(base_model, license_fields):
    card = render_model_card(tiny_adapter(tiny_transformer()), "org/a", base_model, "google/siglip")
    data = ModelCard(str(card)).data.to_dict()  # what the Hub reads back
    assert {key: data[key] for key in license_fields} == license_fields
    overridden = render_model_card(tiny_adapter(tiny_transformer()), "org/a", base_model, "e", license="mit")
    assert overridden.data.to_dict()["license"] == "mit"


def test_a_card_runs_as_written_on_local_folders_and_names_no_local_path(delta_pipe, tmp_path, monkeypatch):
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    base = tmp_path / "training-machine" / "klein-base"
    FluxDeltaEditPipeline.from_pipe(delta_pipe, text_encoder=None, tokenizer=None).save_pretrained(base)
    card = render_model_card(delta_pipe.delta_adapter, repo_id=str(tmp_path / "out" / "my-adapter"),
                             base_model=str(base), image_encoder=str(tmp_path / "siglip"))  # fmt: skip
    assert str(tmp_path) not in str(card) and "training-machine" not in str(card)
    data = ModelCard(str(card)).data.to_dict()
    assert "base_model" not in data and data["library_name"] == "diffusers-delta"
    delta_pipe.save_delta_adapter(tmp_path / "my-adapter", model_card=card)

    snippet = _python_block(card.text)
    assert 'BASE = "path/to/klein-base"' in snippet and 'ADAPTER = "path/to/my-adapter"' in snippet
    assert "was a local folder, klein-base: put its path here" in snippet and "folder my-adapter: put" in snippet
    snippet = snippet.replace("path/to/klein-base", str(base))
    snippet = snippet.replace("path/to/my-adapter", str(tmp_path / "my-adapter"))
    for name, seed in (("before", 1), ("after", 2), ("query", 0)):
        random_image(seed).save(tmp_path / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    snippet = snippet.replace("edited = pipe(query,", "edited = pipe(max_sequence_length=16, image=query,")
    exec(compile(snippet, "card-snippet", "exec"), {})  # the tiny model's prompt is 16 tokens long
    assert PIL.Image.open(tmp_path / "edited.png").size == (64, 64)


def test_the_shipped_toy_adapter_card_loads_what_ships():
    from diffusers_delta import toyworld

    card = ModelCard.load(toyworld.DEFAULT_MODEL_DIR / "adapter" / "README.md")
    assert "toy-build" not in card.text and card.data.to_dict()["library_name"] == "diffusers-delta"
    namespace = {}
    exec(compile(_python_block(card.text).replace('edited.save("edited.png")', ""), "toy-card", "exec"), namespace)
    assert namespace["edited"].size == (64, 64)


def test_every_saved_adapter_carries_a_card_the_hub_accepts(delta_pipe, tmp_path, caplog):
    """Without a repo id or a card: a card all the same, titled by the adapter and its base, licence fields the Hub
    accepts (none for an unknown local base: the text names the base's licence), and no spurious warning."""
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.save_delta_adapter(tmp_path / "my-adapter")
    card = ModelCard.load(tmp_path / "my-adapter" / "README.md")
    assert card.text.lstrip().startswith("# my-adapter: a Delta-Adapter for a FLUX.2 [klein] base")
    data = card.data.to_dict()
    assert "license" not in data and "whose licence applies to it" in card.text
    compile(_python_block(card.text), "card-snippet", "exec")
    other = render_model_card(tiny_adapter(tiny_transformer()), repo_id="me/a", base_model="someone/klein-tuned",
                              image_encoder="e").data.to_dict()  # fmt: skip
    assert other["license"] == "other" and other["license_name"] and other["license_link"].endswith("klein-tuned")
    pipe = FluxDeltaEditPipeline.from_pipe(delta_pipe).to(torch.bfloat16)  # (diffusers' own warning, for klein)
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe.load_delta_adapter(tmp_path / "my-adapter")  # the float32 adapter cast to bfloat16, quietly
    assert pipe.delta_adapter.dtype == torch.bfloat16 and "should be kept in float32" not in caplog.text


def test_a_card_of_an_adapter_trained_on_the_toy_base_says_so_and_its_snippet_runs(tmp_path, monkeypatch):
    """The CPU recipe trains on the toy world's base editor: the card is titled for it, does not call it a FLUX.2
    [klein] checkpoint, and its snippet (the recipe's before.png/after.png) runs on the embedded base."""
    from diffusers_delta import toyworld

    pipe = toyworld.load_pipeline()
    pipe.save_delta_adapter(tmp_path / "toy-adapter")
    card = render_model_card(pipe.delta_adapter, repo_id=str(tmp_path / "toy-adapter"),
                             base_model=str(toyworld.DEFAULT_MODEL_DIR / "base"), image_encoder="siglip",
                             toy_base=True)  # fmt: skip
    title = next(line for line in card.text.splitlines() if line.startswith("# "))
    assert title == "# toy-adapter: a Delta-Adapter for the toy world's base editor"
    assert "not on a FLUX.2 [klein] checkpoint" in card.text and str(tmp_path) not in str(card)
    snippet = _python_block(card.text).replace("path/to/toy-adapter", str(tmp_path / "toy-adapter"))
    source, target = toyworld.make_pair("grey", 7)
    source.save(tmp_path / "before.png")
    target.save(tmp_path / "after.png")
    toyworld.make_pair("frame", 8)[0].save(tmp_path / "query.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "toy-card", "exec"), {})
    assert PIL.Image.open(tmp_path / "edited.png").size == (64, 64)
