"""The `diffusers-delta` command on a model folder laid out like the embedded toy model (built from tiny models)."""

import os
import re

import numpy as np
import PIL.Image
import pytest

from diffusers_delta import cli, toyworld
from diffusers_delta.grids import make_edit_grid
from diffusers_delta.pipelines import FluxDeltaEditPipeline


def test_load_pipeline_goes_through_from_pretrained_and_load_delta_adapter(model_dir):
    pipe = toyworld.load_pipeline(model_dir)
    assert pipe.text_encoder is None and pipe.delta_adapter is not None and pipe.empty_prompt_embeds is not None
    with pytest.raises(FileNotFoundError, match="build_default_model.py"):
        toyworld.load_pipeline(model_dir / "missing")


def test_demo_writes_its_grid_and_prints_per_edit_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out), "--model-dir", str(model_dir), "--edits", "recolor", "enlarge"])
    grid = PIL.Image.open(out)
    assert grid.size == (110 + 5 * 128, 20 + 2 * 128)  # a strip of row titles, 5 columns, 2 edits
    titles = np.asarray(grid.crop((0, 20, 110, 20 + 2 * 128)).convert("L"))
    assert (titles[:128] < 128).any() and (titles[128:] < 128).any()  # each row is titled
    printed = capsys.readouterr().out
    assert "recolor seen edit" in printed and "enlarge unseen edit" in printed


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


@pytest.fixture
def images(tmp_path):
    paths = {}
    for name, image in zip(("source", "target"), toyworld.make_pair("flip", 1)):
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    paths["query"] = tmp_path / "query.png"
    toyworld.make_pair("flip", 2)[0].resize((96, 80)).save(paths["query"])
    return paths


def test_a_one_size_model_edits_other_sizes_by_resizing_and_says_so(run_cli, model_dir, images, tmp_path):
    out = tmp_path / "edited.png"
    exemplar = ["--exemplar", images["source"], images["target"]]
    models = ["--base", model_dir / "base", "--adapter", model_dir / "adapter"]
    code, _, err = run_cli(["edit", *exemplar, "--query", images["query"], "--out", out, *models])
    assert code == 0 and PIL.Image.open(out).size == (96, 80)
    assert "edits 64x64 images only: resizing the inputs" in err and "back to 96x80" in err
    assert err.count("edits 64x64 images only") == 1  # said once per edit
    shipped = toyworld.DEFAULT_MODEL_DIR / "adapter"  # an adapter of the embedded base, given by its folder
    code, _, err = run_cli(["edit", *exemplar, "--query", images["query"], "--out", out, "--adapter", shipped])
    assert code == 0 and f"toy-world model's base (64x64 scenes) with the adapter {shipped}" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"query": "missing.png"}, "error: query .*missing.png does not exist."),
        ({"query": "__text__"}, "error: query .* is not a readable image"),
        ({"out": "edited.txt"}, "error: --out .*edited.txt: .txt is not an image format"),
        ({"adapter": "./no/such/adapter"}, "error: --adapter: No folder './no/such/adapter'"),
        ({"query": "__bomb__"}, "error: query .*bomb.png is too large to decode safely"),
    ],
    ids=["missing-image", "not-an-image", "bad-extension", "missing-adapter-folder", "decompression-bomb"],
)
def test_mistakes_print_one_line_and_exit_2_before_any_model_loads(
    run_cli, model_dir, images, tmp_path, monkeypatch, change, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(toyworld, "load_pipeline", no_model)
    monkeypatch.setattr(FluxDeltaEditPipeline, "from_pretrained", no_model)
    (tmp_path / "text.png").write_text("not an image")
    paths = {**images, "out": tmp_path / "edited.png", "adapter": model_dir / "adapter", **change}
    paths["query"] = {"__text__": tmp_path / "text.png", "__bomb__": bomb_png(tmp_path / "bomb.png")}.get(
        paths["query"], paths["query"])  # fmt: skip
    exemplar = ["--exemplar", paths["source"], paths["target"]]
    models = ["--base", model_dir / "base", "--adapter", paths["adapter"]]
    code, _, err = run_cli(["edit", *exemplar, "--query", paths["query"], "--out", paths["out"], *models])
    assert code == 2 and re.match(message, err) and err.count("\n") == 1


def bomb_png(path):
    """A small PNG whose header declares 100000 x 100000 pixels (a decompression bomb)."""
    import struct
    import zlib

    PIL.Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", 100_000, 100_000) + data[24:29]  # IHDR: width, height, then depth, colour, ...
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))
    return path


def test_a_photo_is_edited_upright_as_its_exif_orientation_shows_it(run_cli, model_dir, images, tmp_path):
    """A query stored 96x80 with EXIF orientation 6 (a quarter turn) is displayed 80x96: so is its edit."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.open(images["query"]).save(tmp_path / "turned.png", exif=exif)
    out = tmp_path / "edited.png"
    exemplar = ["--exemplar", images["source"], images["target"]]
    models = ["--base", model_dir / "base", "--adapter", model_dir / "adapter"]
    code, _, err = run_cli(["edit", *exemplar, "--query", tmp_path / "turned.png", "--out", out, *models])
    assert code == 0 and PIL.Image.open(out).size == (80, 96) and "back to 80x96" in err


def test_debug_shows_the_traceback(images, tmp_path, capsys):
    with pytest.raises(cli.UsageError, match="does not exist"):
        cli.main(["edit", "--exemplar", str(images["source"]), str(images["target"]), "--query", "missing.png",
                  "--out", str(tmp_path / "x.png"), "--debug"])  # fmt: skip


def test_demo_creates_the_folder_of_its_output(run_cli, model_dir, tmp_path):
    out = tmp_path / "new" / "folder" / "demo.png"
    code, printed, _ = run_cli(["demo", "--out", out, "--model-dir", model_dir, "--edits", "flip"])
    assert code == 0 and PIL.Image.open(out).size == (110 + 5 * 128, 20 + 128) and "Wrote" in printed


def test_grid_row_titles_must_match_the_rows():
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2 row labels for 1 rows"):
        make_edit_grid([[image]], ["output"], row_labels=["a", "b"])


def test_grid_titles_spell_arrows_and_times_in_ascii():
    """PIL's default font has no glyph for → or ×: they would show as empty boxes."""
    image = PIL.Image.new("RGB", (8, 8))

    def titled(label, row_label):
        return np.asarray(make_edit_grid([[image]], [label], cell_size=64, row_labels=[row_label]))

    assert np.array_equal(titled("red→blue", "scale ×0.5"), titled("red->blue", "scale x0.5"))


def test_the_documentations_placeholder_adapter_is_named_as_such_at_once(run_cli, images, tmp_path):
    import time

    start = time.perf_counter()
    code, _, err = run_cli(["edit", "--exemplar", images["source"], images["target"], "--query", images["query"],
                            "--out", tmp_path / "x.png", "--base", "black-forest-labs/FLUX.2-klein-4B",
                            "--adapter", "org/delta-adapter"])  # fmt: skip
    assert code == 2 and time.perf_counter() - start < 2
    assert re.match(r"error: --adapter: 'org/delta-adapter' is the documentation's placeholder.*no trained FLUX.2 "
                    r"\[klein\] Delta-Adapter is published yet", err) and err.count("\n") == 1  # fmt: skip


@pytest.mark.parametrize(
    "base, message",
    [
        ("model-Q8_0.gguf", r"error: --base .*model-Q8_0.gguf is a single transformer file.*from_single_file.*"
                            r"load_delta_adapter"),
        ("notes.txt", r"error: --base .*notes.txt is a file: pass a pipeline folder"),
        ("empty", r"error: --base .*empty holds no model_index.json"),
    ],
)  # fmt: skip
def test_a_base_that_is_no_pipeline_folder_says_what_to_pass(run_cli, model_dir, images, tmp_path, base, message):
    (tmp_path / "model-Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["edit", "--exemplar", images["source"], images["target"], "--query", images["query"],
                            "--out", tmp_path / "x.png", "--base", tmp_path / base,
                            "--adapter", model_dir / "adapter"])  # fmt: skip
    assert code == 2 and re.match(message, err) and err.count("\n") == 1


def test_a_command_prints_nothing_it_does_not_mean():
    """diffusers' imports make transformers say that image processors fall back to PIL without torchvision: not a
    line a diffusers-delta user can act on, so `--help` prints its usage and nothing else."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "diffusers_delta.cli", "edit", "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("usage: diffusers-delta edit")
    assert result.stderr == ""


def test_only_the_torchvision_fallback_notice_is_dropped():
    import logging

    from diffusers_delta.notices import TorchvisionFallbackFilter

    def record(message):
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, "", 0, message, None, None)

    notice = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
              "backward compatibility.")  # fmt: skip
    assert not TorchvisionFallbackFilter().filter(record(notice))
    assert TorchvisionFallbackFilter().filter(record("`Foo` requires torchvision: install it."))


def test_out_that_means_the_other_kind_of_edit_is_refused_naming_it(run_cli, model_dir, images, tmp_path):
    (tmp_path / "queries").mkdir()
    PIL.Image.open(images["query"]).save(tmp_path / "queries" / "q.png")
    exemplar = ["--exemplar", images["source"], images["target"]]
    models = ["--base", model_dir / "base", "--adapter", model_dir / "adapter"]
    code, _, err = run_cli(["edit", *exemplar, "--queries", tmp_path / "queries", "--out", tmp_path / "result.png",
                            *models])  # fmt: skip
    assert code == 2 and "names an image file: with --queries, --out is the folder" in err
    assert not (tmp_path / "result.png").exists()  # no folder of that name made
    code, _, err = run_cli(["edit", *exemplar, "--query", images["query"], "--out", tmp_path / "queries", *models])
    assert code == 2 and "is a folder: give an image file name, such as" in err and "--queries edits a folder" in err


def test_an_unknown_flag_after_a_command_prints_that_commands_usage(run_cli, images, tmp_path):
    code, _, err = run_cli(["edit", "--exemplar", images["source"], images["target"], "--query", images["query"],
                            "--out", tmp_path / "x.png", "--bogus"])  # fmt: skip
    assert code == 2 and err.startswith("usage: diffusers-delta edit") and "unrecognized arguments: --bogus" in err


def test_every_flag_of_every_command_is_explained_in_its_help():
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    for name, command in commands.choices.items():
        unexplained = [action.dest for action in command._actions if not action.help and action.dest != "help"]
        assert unexplained == [], f"{name}: {unexplained}"


def test_mask_edits_only_inside_it_and_mistakes_are_named(run_cli, model_dir, images, tmp_path):
    exemplar = ["--exemplar", images["source"], images["target"]]
    models = ["--base", model_dir / "base", "--adapter", model_dir / "adapter"]
    mask = np.zeros((80, 96), dtype=np.uint8)  # the query's 96x80
    mask[:, :48] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "edited.png"
    code, _, err = run_cli(["edit", *exemplar, "--query", images["query"], "--mask", tmp_path / "mask.png",
                            "--out", out, *models])  # fmt: skip
    assert code == 0, err
    assert PIL.Image.open(out).size == (96, 80)
    PIL.Image.fromarray(mask[:40]).save(tmp_path / "small_mask.png")
    code, _, err = run_cli(["edit", *exemplar, "--query", images["query"], "--mask", tmp_path / "small_mask.png",
                            "--out", out, *models])  # fmt: skip
    assert code == 2 and "--mask is 96x40 and --query 96x80" in err
    code, _, err = run_cli(["edit", *exemplar, "--queries", tmp_path, "--mask", tmp_path / "mask.png",
                            "--out", tmp_path / "outs", *models])  # fmt: skip
    assert code == 2 and "--mask goes with --query" in err
