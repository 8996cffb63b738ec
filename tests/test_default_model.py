"""The embedded default model: it loads offline, through the real loading code, its app examples are edits it makes,
and the demo shows it editing."""

import PIL.Image
import pytest

from diffusers_delta import cli, toyworld
from diffusers_delta.app import ExemplarEditor
from diffusers_delta.evaluation import mean_absolute_error
from diffusers_delta.toyworld import showcase


def test_shipped_model_loads_offline_small_and_knows_its_one_size():
    files = [path for path in toyworld.DEFAULT_MODEL_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 25 * 2**20  # the package stays small
    pipe = toyworld.load_pipeline()
    source, target = showcase.demo_examples(toyworld.model_world())[0].pair(seed=0)
    with pytest.raises(ValueError, match="edits only 64x64 images and the query is 512x384"):
        pipe(source.resize((512, 384)), exemplar=(source, target))


def test_the_apps_examples_are_edits_the_shipped_model_makes():
    world = toyworld.model_world()
    pipe = toyworld.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    editor = ExemplarEditor(pipe)
    for name, exemplar_seed, query_seeds, adapt_steps in showcase.APP_EXAMPLES[world]:
        example = showcase.find_example(world, name)
        queries, truths = zip(*(example.pair(seed) for seed in query_seeds))
        outputs = editor.edit(*example.pair(exemplar_seed), list(queries), adapt_steps=adapt_steps)  # as the app does
        for query, output, truth in zip(queries, outputs, truths):
            assert mean_absolute_error(output, truth) < mean_absolute_error(query, truth), name


def test_demo_on_the_shipped_model_writes_its_grid_and_says_which_rows_fail(tmp_path, capsys):
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out)])
    rows = showcase.DEMO_ROWS[toyworld.model_world()]
    width, height = PIL.Image.open(out).size
    assert height == 20 + len(rows) * 128 and width > 5 * 128  # a title strip and a 128-pixel row per edit
    printed = capsys.readouterr().out
    assert "'identity' leaves the query unedited" in printed
    verdicts = ("edits", "FAILS (worse than the unedited query)")
    table = [line for line in printed.splitlines() if line.endswith(verdicts)]
    assert len(table) == len(rows)
    for line in table:  # a row fails exactly when its output is no better than identity
        identity, output = _errors(line)
        assert line.endswith("edits") == (output < identity)


def _errors(line: str) -> tuple[float, float]:
    """(identity, output) of one line of the demo's table."""
    numbers = [float(word) for word in line.split() if word.replace(".", "", 1).isdigit() and "." in word]
    return numbers[-2], numbers[-1]
