"""Folder-scale editing: `diffusers-delta edit --queries DIR --out DIR`, resumable, atomic, and split between two
processes under `accelerate launch` (gloo on CPU), on a model folder laid out like the toy model."""

import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from diffusers_delta import cli, toyworld
from diffusers_delta.atomic_folder import write_image_atomically
from diffusers_delta.folder_edit import edit_folder, list_queries
from diffusers_delta.image_inputs import fit_to_model_size
from diffusers_delta.testing import free_port


QUERIES = ["a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.jpg", "sub/g.png"]


@pytest.fixture
def folders(tmp_path):
    """An exemplar pair and a folder of queries of two sizes, one in a subfolder, with a hidden file and a text file
    that are not queries."""
    source, target = toyworld.make_pair("flip", 1)
    source.save(tmp_path / "source.png")
    target.save(tmp_path / "target.png")
    queries = tmp_path / "queries"
    (queries / "sub").mkdir(parents=True)
    for index, name in enumerate(QUERIES):
        image = toyworld.make_pair("flip", 10 + index)[0]
        (image.resize((80, 96)) if index % 3 == 0 else image).save(queries / name)
    (queries / ".hidden.png").write_bytes(b"")
    (queries / "notes.txt").write_text("not a query")
    return tmp_path


def command(folders, model_dir, out, *extra) -> list[str]:
    return [
        "edit", "--exemplar", str(folders / "source.png"), str(folders / "target.png"), "--queries",
        str(folders / "queries"), "--out", str(out), "--base", str(model_dir / "base"), "--adapter",
        str(model_dir / "adapter"), *map(str, extra),
    ]  # fmt: skip


def read(folder, name) -> np.ndarray:
    return np.asarray(PIL.Image.open(folder / name), dtype=np.int16)


def test_every_query_is_edited_once_keeping_names_and_sizes_and_a_rerun_skips_them(run_cli, folders, model_dir):
    out = folders / "out"
    code, printed, _ = run_cli(command(folders, model_dir, out, "--batch-size", 2))
    assert code == 0 and "Edited 7 images" in printed and "0 were there already" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == QUERIES
    for name in QUERIES:
        assert PIL.Image.open(out / name).size == PIL.Image.open(folders / "queries" / name).size
        assert PIL.Image.open(out / name).format == ("JPEG" if name.endswith(".jpg") else "PNG")
    times = {name: (out / name).stat().st_mtime_ns for name in QUERIES}
    (out / "c.png").unlink()  # as if cut off before it
    code, printed, _ = run_cli(command(folders, model_dir, out, "--batch-size", 2))
    assert code == 0 and "Edited 1 images" in printed and "6 were there already" in printed
    assert all((out / name).stat().st_mtime_ns == times[name] for name in QUERIES if name != "c.png")


def test_outputs_do_not_depend_on_the_batch_size_and_equal_one_query_edits(run_cli, folders, model_dir):
    run_cli(command(folders, model_dir, folders / "one", "--batch-size", 1))
    run_cli(command(folders, model_dir, folders / "four", "--batch-size", 4))
    for name in QUERIES:
        if name.endswith(".png"):  # lossless: at most one level of rounding apart
            assert np.abs(read(folders / "one", name) - read(folders / "four", name)).max() <= 1, name
    pipe = toyworld.load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    exemplar = (PIL.Image.open(folders / "source.png"), PIL.Image.open(folders / "target.png"))
    edit_folder(pipe, pipe.encode_exemplar(exemplar), folders / "queries", folders / "library", batch_size=3,
                fit=lambda images: fit_to_model_size(64, images))  # fmt: skip
    assert all(np.abs(read(folders / "one", n) - read(folders / "library", n)).max() <= 1 for n in QUERIES[1:3])


@pytest.mark.parametrize("failing_write", [1, 7], ids=["first-file", "last-file"])
def test_a_failed_write_leaves_only_whole_outputs_and_the_rerun_completes(
    run_cli, folders, model_dir, monkeypatch, failing_write
):
    out = folders / "out"
    save = PIL.Image.Image.save
    writes = []

    def failing_save(image, fp, *args, **kwargs):
        writes.append(fp)
        if len(writes) == failing_write:
            fp.write(b"\x89PNG half an image")  # a partial write, then the disk fills
            raise OSError(28, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    code, _, err = run_cli(command(folders, model_dir, out))
    assert code == 2 and "No space left on device" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(written) == failing_write - 1 and not any(name.startswith(".") for name in written)  # no temporary
    for name in written:
        PIL.Image.open(out / name).load()  # complete
    monkeypatch.setattr(PIL.Image.Image, "save", save)
    code, printed, _ = run_cli(command(folders, model_dir, out))
    assert code == 0 and f"Edited {8 - failing_write} images" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == QUERIES


def test_two_processes_split_the_queries_and_write_what_one_process_writes(folders, model_dir, capsys, tmp_path):
    """`accelerate launch -m diffusers_delta.cli edit ...` on 2 CPU processes (gloo); one --query is edited once."""
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m",
        "diffusers_delta.cli",
    ]  # fmt: skip
    result = subprocess.run(
        [*launch, *command(folders, model_dir, folders / "two", "--batch-size", 2)],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[:2000] + "\n...\n" + result.stderr[-2000:]  # the first error too
    shares = re.search(r"Edited 7 images into .* \((\d+) \+ (\d+) by 2 processes\)", result.stdout)
    assert shares and sorted(map(int, shares.groups())) == [3, 4], result.stdout  # all 7, by 3 + 4: each once
    single = [sys.executable, "-m", "diffusers_delta.cli"]
    one = subprocess.run(
        [*single, *command(folders, model_dir, folders / "one", "--batch-size", 2)],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    for name in QUERIES:
        difference = np.abs(read(folders / "one", name) - read(folders / "two", name)).max()
        assert difference == 0, f"{name} differs by {difference} levels"
    argv = command(folders, model_dir, folders / "single.png")
    argv[argv.index("--queries") : argv.index("--queries") + 2] = ["--query", str(folders / "queries" / QUERIES[0])]
    single_query = subprocess.run([*launch, *argv], env=environment, capture_output=True, text=True, timeout=300)
    assert single_query.returncode == 0, single_query.stderr[-2000:]
    assert single_query.stdout.count("Wrote ") == 1  # edited and written by one process, not by each
    assert "edited by one of the 2 processes" in single_query.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"queries": "missing"}, r"error: --queries .*missing is not a folder of images\."),
        ({"queries": "empty"}, r"error: --queries .*empty holds no image"),
        ({"out": "source.png"}, r"error: --out .*source.png is a file: with --queries"),
        ({"batch": 0}, r"error: --batch-size must be 1 or more, got 0\."),
        ({"broken": True}, r"error: query .*broken.png is not a readable image"),
        ({"out": "queries"}, r"error: --out .*queries is the --queries folder .*: write the outputs to a folder"),
    ],
    ids=["missing-folder", "no-images", "out-is-a-file", "batch-size-0", "not-an-image-strict", "out-is-queries"],
)
def test_mistakes_are_one_line_before_any_model_loads(run_cli, folders, model_dir, monkeypatch, change, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(toyworld, "load_pipeline", no_model)
    monkeypatch.setattr(cli, "load_edit_pipeline", no_model)
    (folders / "empty").mkdir()
    if change.get("broken"):
        (folders / "queries" / "broken.png").write_text("not an image")
    argv = command(folders, model_dir, folders / change.get("out", "out"), "--batch-size", change.get("batch", 1),
                   *(["--strict"] if change.get("broken") else []))  # fmt: skip
    argv[argv.index("--queries") + 1] = str(folders / change.get("queries", "queries"))
    code, _, err = run_cli(argv)
    assert code == 2 and re.match(message, err) and err.count("\n") == 1, err


def test_listing_skips_hidden_files_other_formats_and_the_output_folder_inside(folders):
    queries = folders / "queries"
    write_image_atomically(PIL.Image.new("RGB", (8, 8)), queries / "edited" / "a.png")
    assert [p.as_posix() for p in list_queries(queries, queries / "edited")] == QUERIES
    assert not [p for p in (queries / "edited").iterdir() if p.name.startswith(".")]  # no temporary left


def test_unreadable_queries_are_skipped_named_and_fail_the_run_at_the_end(run_cli, folders, model_dir):
    """Every readable query is edited (one whose name is not UTF-8 too); a file that is not an image and one whose
    pixels are cut short are named, and the run exits with an error once the rest is written."""
    queries, out = folders / "queries", folders / "out"
    (queries / "broken.png").write_text("not an image")
    whole = (queries / "a.png").read_bytes()
    (queries / "truncated.png").write_bytes(whole[: len(whole) // 2])
    odd_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or archive leaves them
    (queries / odd_name).write_bytes(whole)
    code, printed, err = run_cli(command(folders, model_dir, out))
    assert code == 2 and "Edited 8 images" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*QUERIES, odd_name])  # fmt: skip
    lines = err.strip().splitlines()
    assert re.match(r"skipped broken.png: query .*broken.png is not a readable image", lines[-3])
    assert re.match(r"skipped truncated.png: query .*truncated.png is not a readable image", lines[-2])
    assert re.match(r"error: 2 of the queries could not be read and were left unedited", lines[-1])
    code, printed, _ = run_cli(command(folders, model_dir, out))
    assert code == 2 and "Nothing left to edit: 8 outputs" in printed  # no "0.00 images/s"


def test_a_rerun_removes_the_temporaries_a_killed_run_left_and_only_those(run_cli, folders, model_dir):
    out = folders / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.png.k3x_9zq1.tmp", out / "sub" / ".g.png.abcdefgh.tmp"]
    kept = [out / ".a.png.mine.tmp", out / "notes.tmp", out / ".a.png.k3x_9zq1.tmp.bak"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    code, _, _ = run_cli(command(folders, model_dir, out))
    assert code == 0 and not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_outputs_have_the_modes_of_a_plain_write_under_the_umask(run_cli, folders, model_dir):
    previous = os.umask(0o022)
    try:
        out = folders / "out"
        assert run_cli(command(folders, model_dir, out))[0] == 0
        assert {(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {0o644}
        os.umask(0o027)
        (out / "a.png").unlink()
        assert run_cli(command(folders, model_dir, out))[0] == 0
        assert (out / "a.png").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "5"},
         r"error: RANK=5 is outside WORLD_SIZE=2 \(ranks 0 to 1\): this process would wait forever"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, r"error: RANK=-1 is outside WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, r"error: WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "0"}, r"error: WORLD_SIZE=0: a world holds at least one process"),
        ({"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "3"}, r"error: LOCAL_RANK=3 is outside LOCAL_WORLD_SIZE=1"),
    ],
)  # fmt: skip
def test_a_launcher_environment_that_would_hang_is_refused_at_once(
    run_cli, folders, model_dir, monkeypatch, environment, message
):
    """A rank outside its world (with the address set, as a launcher would) waited forever for its peers; now the
    variables are checked before any process group is made, and the command says what is wrong."""
    import time

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    start = time.perf_counter()
    code, _, err = run_cli(command(folders, model_dir, folders / "out"))
    assert code == 2 and re.match(message, err) and err.count("\n") == 1
    assert time.perf_counter() - start < 30


def test_several_processes_need_an_address_to_meet_at(monkeypatch):
    from diffusers_delta.launch import check_launch_environment

    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set"):
        check_launch_environment({"WORLD_SIZE": "2", "RANK": "0"})
    check_launch_environment({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    check_launch_environment({})  # one process: nothing to check
