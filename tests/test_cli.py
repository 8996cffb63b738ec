"""The `diffusers-delta` command on a model folder laid out like the embedded toy model (built from tiny models)."""

import PIL.Image
import pytest

from diffusers_delta import cli, compute_empty_prompt_embeds, toyworld
from diffusers_delta.pipelines import FluxDeltaEditPipeline
from diffusers_delta.testing import TEXT_KWARGS, tiny_delta_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`base/` (a text-free pipeline folder) and `adapter/` (weights, SigLIP, empty prompt), like the toy model."""
    root = tmp_path_factory.mktemp("toy_model")
    pipe = tiny_delta_pipeline(adapter_std=0.05)
    pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    pipe.save_delta_adapter(root / "adapter")
    FluxDeltaEditPipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None, transformer=pipe.transformer,
        is_distilled=True,
    ).save_pretrained(root / "base")  # fmt: skip
    return root


def test_load_pipeline_goes_through_from_pretrained_and_load_delta_adapter(model_dir):
    pipe = toyworld.load_pipeline(model_dir)
    assert pipe.text_encoder is None and pipe.delta_adapter is not None and pipe.empty_prompt_embeds is not None
    with pytest.raises(FileNotFoundError, match="build_default_model.py"):
        toyworld.load_pipeline(model_dir / "missing")


def test_demo_writes_its_grid_and_prints_per_edit_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out), "--model-dir", str(model_dir), "--edits", "recolor", "enlarge"])
    grid = PIL.Image.open(out)
    assert grid.size == (5 * 128, 20 + 2 * 128)  # 5 columns (src, tgt, query, output, truth), 2 edits
    printed = capsys.readouterr().out
    assert "recolor     seen" in printed and "enlarge     unseen" in printed


def test_edit_with_a_given_base_and_adapter(model_dir, tmp_path, capsys):
    paths = []
    for name, image in zip(
        ("source", "target", "query"), (*toyworld.make_pair("flip", 1), toyworld.make_pair("flip", 2)[0])
    ):
        paths.append(tmp_path / f"{name}.png")
        image.save(paths[-1])
    out = tmp_path / "edited.png"
    base = ["edit", "--exemplar", str(paths[0]), str(paths[1]), "--query", str(paths[2]), "--out", str(out)]
    cli.main([*base, "--base", str(model_dir / "base"), "--adapter", str(model_dir / "adapter"), "--adapt-steps", "1"])
    assert PIL.Image.open(out).size == (64, 64) and "Adapted for 1 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--base", str(model_dir / "base")])
    assert exit_info.value.code == 2 and "error: --adapter is required" in capsys.readouterr().err
