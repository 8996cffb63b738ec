"""The embedded default model: it loads offline, through the real loading code, and the demo shows it editing."""

import numpy as np
import PIL.Image
import pytest

from diffusers_delta import cli, toyworld


def test_shipped_model_loads_offline_and_edits_a_seen_edit_better_than_identity(tmp_path):
    files = [path for path in toyworld.DEFAULT_MODEL_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 15 * 2**20  # the package stays small
    pipe = toyworld.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    source, target = toyworld.make_pair("grayscale", seed=70_000_000)
    scene = toyworld.generate_scene(np.random.default_rng(70_000_001))
    query = PIL.Image.fromarray(toyworld.render(scene))
    truth = np.asarray(toyworld.render(toyworld.EDITS["grayscale"](scene)), float)
    output = np.asarray(pipe(query, exemplar=(source, target)).images[0], float)
    assert np.abs(output - truth).mean() < np.abs(np.asarray(query, float) - truth).mean()
    with pytest.raises(ValueError, match="edits only 64x64 images and the query is 512x384"):
        pipe(query.resize((512, 384)), exemplar=(source, target))  # it knows one size, and says so


def test_demo_on_the_shipped_model_writes_its_grid(tmp_path):
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out)])
    rows = toyworld.showcase.DEMO_ROWS[toyworld.model_world()]
    assert PIL.Image.open(out).size == (110 + 5 * 128, 20 + len(rows) * 128)
