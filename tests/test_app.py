"""The Gradio app: `diffusers-delta app` served on localhost and called by a real `gradio_client`, and the editor
behind it (exemplar cache, sizes, errors shown as the library's messages)."""

import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_delta import FluxDeltaInpaintPipeline, compute_empty_prompt_embeds, toyworld
from diffusers_delta.testing import TEXT_KWARGS, free_port, random_image, tiny_delta_pipeline
from diffusers_delta.toyworld import showcase


gradio_client = pytest.importorskip("gradio_client")
from diffusers_delta.app import ExemplarEditor, build_app, mask_of  # noqa: E402


def connect(url: str, server: subprocess.Popen | None = None, timeout: float = 120.0):
    """A `gradio_client.Client` of the app at `url`, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return gradio_client.Client(url, verbose=False)
        except Exception:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the app exited with code {server.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def served_app(model_dir, tmp_path_factory):
    """`diffusers-delta app --base ... --adapter ... --port N` in its own process, stopped by its PID at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "diffusers_delta.cli", "app", "--base", str(model_dir / "base"), "--adapter",
             str(model_dir / "adapter"), "--port", str(port)],
            # one thread, as the suite's (conftest): torch's sums differ in the last bit across thread counts
            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"},
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        client = connect(f"http://127.0.0.1:{port}/", server)
        client.log = log
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def images(tmp_path):
    paths = {}
    source, target = toyworld.make_pair("invert", 3)
    for name, image in (("source", source), ("target", target), ("query", toyworld.make_pair("invert", 4)[0])):
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    paths["wide"] = tmp_path / "wide.png"
    toyworld.make_pair("invert", 5)[0].resize((96, 64)).save(paths["wide"])
    return paths


def text_free_pipeline():
    """A tiny pipeline that edits under the empty prompt's stored embeddings, as the app's pipelines do."""
    pipe = tiny_delta_pipeline(adapter_std=0.05)
    pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    return pipe


def gallery(*paths) -> list[dict]:
    return [{"image": gradio_client.handle_file(str(path)), "caption": None} for path in paths]


def test_the_served_app_gives_the_pipeline_output_for_the_same_inputs(served_app, model_dir, images):
    handle = gradio_client.handle_file
    result = served_app.predict(
        handle(str(images["source"])), handle(str(images["target"])), gallery(images["query"], images["wide"]),
        0.8, 3, 5, 0, api_name="/edit",
    )  # fmt: skip
    assert [item["caption"] for item in result] == ["exemplar source", "exemplar target", "edited query 1",
                                                    "edited query 2"]  # fmt: skip
    pipe = toyworld.load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    source, target, query = (PIL.Image.open(images[name]) for name in ("source", "target", "query"))
    expected = pipe(query, exemplar=(source, target), delta_scale=0.8, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(result[2]["image"])), np.asarray(expected))
    assert PIL.Image.open(result[3]["image"]).size == (96, 64)  # back at its own size


def test_missing_inputs_show_a_message_not_a_traceback(served_app, images):
    handle = gradio_client.handle_file
    with pytest.raises(Exception, match="Give at least one query image to edit.") as error:
        served_app.predict(handle(str(images["source"])), handle(str(images["target"])), [], 1.0, 4, 0, 0,
                           api_name="/edit")  # fmt: skip
    assert "Traceback" not in str(error.value)


def test_the_exemplar_is_encoded_once_for_many_queries_and_again_for_a_new_pair():
    pipe = text_free_pipeline()
    editor = ExemplarEditor(pipe)
    source, target, query = random_image(1), random_image(2), random_image(3)
    first = editor.edit(source, target, [query], seed=1)[0]
    again = editor.edit(source.copy(), target.copy(), [query, random_image(4)], seed=1)
    assert editor.encodings == 1 and np.array_equal(np.asarray(first), np.asarray(again[0]))
    editor.edit(source, random_image(5), [query])
    assert editor.encodings == 2
    adapted = editor.edit(source, target, [query], seed=1, adapt_steps=1)[0]  # adapts, then restores the adapter
    assert editor.encodings == 2 and not np.array_equal(np.asarray(adapted), np.asarray(first))
    assert np.array_equal(np.asarray(editor.edit(source, target, [query], seed=1)[0]), np.asarray(first))


def test_a_library_error_reaches_the_page_as_its_one_line_message(images):
    pipe = text_free_pipeline()  # of no one image size: a 4x4 query is refused, not resized
    app = build_app(pipe)
    PIL.Image.new("RGB", (4, 4)).save(images["query"])
    _, url, _ = app.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                   quiet=True)  # fmt: skip
    try:
        client = connect(url)
        handle = gradio_client.handle_file
        with pytest.raises(Exception, match=r"query is 4x4 pixels; both sides must be at least \d+\. Upscale it"):
            client.predict(handle(str(images["source"])), handle(str(images["target"])), gallery(images["query"]),
                           1.0, 4, 0, 0, api_name="/edit")  # fmt: skip
    finally:
        app.close()


def test_the_space_entry_builds_the_app_on_the_model_its_variables_name(model_dir, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("BASE_MODEL", str(model_dir / "base"))
    monkeypatch.setenv("DELTA_ADAPTER", str(model_dir / "adapter"))
    space = runpy.run_path(str(Path(__file__).parents[1] / "space" / "app.py"), run_name="space")
    assert space["pipe"].delta_adapter is not None and space["pipe"].config.image_size == 64
    assert "/edit" in [f"/{fn.api_name}" for fn in space["demo"].fns.values()]


def test_the_toy_examples_are_drawn_once_and_reused_by_every_launch(tmp_path, monkeypatch):
    """The app's examples live in one folder of the temporary directory: launches neither redraw nor leave copies."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    world = toyworld.model_world()
    examples = showcase.APP_EXAMPLES[world]
    build_app(text_free_pipeline(), toy_examples=True)
    (folder,) = tmp_path.glob("diffusers-delta-examples-*")  # beside Gradio's own cache
    drawn = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert len(drawn) == sum(2 + len(queries) for _, _, queries, _ in examples)  # each exemplar and its queries
    assert all(name.endswith(".png") for name in drawn)
    name, _, (seed, *_), _ = examples[1]
    (folder / f"1-query-{seed}.png").unlink()  # a folder left incomplete is drawn again, whole
    build_app(text_free_pipeline(), toy_examples=True)
    assert list(tmp_path.glob("diffusers-delta-examples-*")) == [folder]
    assert sorted(path.name for path in folder.iterdir()) == sorted(drawn)
    query = PIL.Image.open(folder / f"1-query-{seed}.png")  # the second example's first query
    assert np.array_equal(np.asarray(query), np.asarray(showcase.find_example(world, name).pair(seed)[0]))
    unchanged = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    build_app(text_free_pipeline(), toy_examples=True)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == unchanged  # complete: reused as is


def test_the_page_says_which_model_it_serves_and_what_it_knows(model_dir):
    from diffusers_delta.app import describe_model

    toy = describe_model(None, None)
    assert "toy-world model" in toy and "64x64" in toy and "photos come out as noise" in toy
    if toyworld.model_world() == showcase.WORLD_1:
        assert all(edit in toy for edit in (*toyworld.SEEN_EDITS, *toyworld.UNSEEN_EDITS))
    elif toyworld.model_world() == showcase.WORLD_3:
        assert all(edit in toy for edit in toyworld.edit_space.HELD_OUT_EDITS)
    else:
        assert all(family in toy for family in (*toyworld.SEEN_FAMILIES, *toyworld.HELD_OUT_FAMILIES))
    real = describe_model("black-forest-labs/FLUX.2-klein-4B", "me/my-adapter")
    assert "`black-forest-labs/FLUX.2-klein-4B`" in real and "`me/my-adapter`" in real and "64x64" in real
    app = build_app(text_free_pipeline(), about=toy)
    shown = [c["props"].get("value") for c in app.config["components"] if c["type"] == "markdown"]
    assert toy in shown


def test_a_query_too_small_for_the_toy_model_gets_the_librarys_message(model_dir):
    editor = ExemplarEditor(toyworld.load_pipeline(model_dir))
    source, target = toyworld.make_pair("flip", 1)
    with pytest.raises(ValueError, match=r"query is 1x1 pixels; both sides must be at least 64"):
        editor.edit(source, target, [PIL.Image.new("RGB", (1, 1))])


def test_an_upload_that_is_no_image_gets_a_one_line_message_not_a_bare_error(images):
    """Gradio opens uploads before the app's function runs: a text file renamed .png is named on the page."""
    (images["query"].parent / "notes.png").write_text("not an image")
    app = build_app(text_free_pipeline())
    import diffusers_delta.app

    assert not Path(diffusers_delta.app.__file__).with_suffix(".pyi").exists()  # Gradio wrote nothing into the package
    _, url, _ = app.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                   quiet=True)  # fmt: skip
    try:
        client = connect(url)
        handle = gradio_client.handle_file
        notes = images["query"].parent / "notes.png"
        with pytest.raises(Exception, match=r"Exemplar source \(before\): notes.png is not a readable image"):
            client.predict(handle(str(notes)), handle(str(images["target"])), gallery(images["query"]), 1.0, 4, 0, 0,
                           api_name="/edit")  # fmt: skip
        with pytest.raises(Exception, match=r"Queries: an upload is not a readable image"):
            client.predict(handle(str(images["source"])), handle(str(images["target"])), gallery(notes), 1.0, 4, 0,
                           0, api_name="/edit")  # fmt: skip
    finally:
        app.close()


def test_the_space_names_its_own_variables_when_one_is_missing_or_does_not_fit(model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    space = str(Path(__file__).parents[1] / "space" / "app.py")
    monkeypatch.setenv("BASE_MODEL", str(model_dir / "base"))
    monkeypatch.delenv("DELTA_ADAPTER", raising=False)
    missing = r"BASE_MODEL is set \(.*\) but DELTA_ADAPTER is not: set DELTA_ADAPTER"
    with pytest.raises(Exception, match=missing) as caught:
        runpy.run_path(space, run_name="space")
    assert type(caught.value).__name__ == "SpaceSetupError"
    foreign = text_free_pipeline()  # an adapter of another transformer than the toy model's
    foreign.save_delta_adapter(tmp_path / "foreign")
    monkeypatch.delenv("BASE_MODEL")
    monkeypatch.setenv("DELTA_ADAPTER", str(tmp_path / "foreign"))
    with pytest.raises(Exception, match=r"DELTA_ADAPTER \(.*foreign\) does not load on the embedded toy model.*"
                                        r"set BASE_MODEL to the base it was trained for") as caught:  # fmt: skip
        runpy.run_path(space, run_name="space")
    assert type(caught.value).__name__ == "SpaceSetupError"


def test_the_app_command_says_where_it_serves_and_names_its_own_flag(served_app):
    """Gradio's start-up lines advise `share=True` in `launch()`; the command's name its URL and its `--share`."""
    started = served_app.log.read_text()
    assert re.search(r"Serving the app at http://127.0.0.1:\d+/? \(Ctrl\+C stops it\)\.", started)
    assert "--share also opens a public gradio.live link." in started and "launch()" not in started


def test_a_painted_or_uploaded_mask_limits_the_edit_to_its_area():
    pipe = text_free_pipeline()
    editor = ExemplarEditor(pipe)
    source, target, query = random_image(1), random_image(2), random_image(3)
    painted = PIL.Image.new("RGBA", (64, 64))
    painted.paste((255, 0, 0, 255), (0, 0, 32, 64))  # a stroke over the left half
    mask = mask_of({"background": query, "layers": [painted], "composite": None})
    assert mask.mode == "L" and mask.getbbox() == (0, 0, 32, 64)
    uploaded = PIL.Image.new("RGB", (64, 64))
    uploaded.paste((255, 255, 255), (0, 0, 32, 64))
    empty_layer = PIL.Image.new("RGBA", (64, 64))
    assert mask_of({"background": uploaded, "layers": [empty_layer], "composite": None}).getbbox() == (0, 0, 32, 64)
    assert mask_of(None) is None
    edited = editor.edit(source, target, [query], seed=1, mask=mask)[0]
    expected = FluxDeltaInpaintPipeline.from_pipe(pipe)(
        query, mask_image=mask, exemplar=(source, target), generator=torch.Generator().manual_seed(1)
    ).images[0]
    assert np.array_equal(np.asarray(edited), np.asarray(expected))
    kontext = ExemplarEditor(tiny_delta_pipeline(backbone="flux1"))
    with pytest.raises(ValueError, match="FLUX.2 \\[klein\\] base"):
        kontext.edit(source, target, [query], mask=mask)
