"""benchmarks/evaluate.py: toy-world tasks with truths, evaluated end to end with the embedded toy model and a tiny
CLIP saved to a folder; the task layout's mistakes refused before any model loads."""

import csv
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import evaluate  # noqa: E402


@pytest.fixture
def clip_folder(tmp_path):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    return tmp_path / "clip"


def test_toy_tasks_are_evaluated_with_truths_into_a_table_a_summary_and_grids(tmp_path, clip_folder, capsys):
    evaluate.main(["--write_toy_tasks", str(tmp_path / "tasks"), "--toy_edits", "recolor", "flip", "--toy_queries",
                   "2"])  # fmt: skip
    tasks = evaluate.read_tasks(tmp_path / "tasks")
    assert [t.name for t in tasks] == ["flip", "recolor"] and all(len(t.truths) == 2 for t in tasks)

    evaluate.main(["--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "out"), "--embedder", str(clip_folder)])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 4 and {row["task"] for row in rows} == {"flip", "recolor"}
    for row in rows:
        assert -1 <= float(row["clip_i"]) <= 1 and -1 <= float(row["directional"]) <= 1
        assert 0 <= float(row["error"]) <= 1 and float(row["identity_error"]) > 0
        assert float(row["gap_closed"]) == pytest.approx(1 - float(row["error"]) / float(row["identity_error"]))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| all | 4 |" in summary and "gap_closed" in summary and summary in printed
    assert "LPIPS is unavailable" in printed or rows[0]["lpips"] != ""  # one line, and the rest ran
    grid = PIL.Image.open(tmp_path / "out" / "grids" / "flip.png")
    assert grid.width == 5 * 128  # source, target, query, output, truth


def test_a_task_folder_without_its_pair_or_queries_is_refused_before_loading(tmp_path):
    (tmp_path / "tasks" / "edit" / "queries").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no queries/ images"):
        evaluate.read_tasks(tmp_path / "tasks")
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "tasks" / "edit" / "queries" / "q.png")
    with pytest.raises(ValueError, match="needs exactly one source image"):
        evaluate.read_tasks(tmp_path / "tasks")
    with pytest.raises(SystemExit):
        evaluate.parse_args([])


def test_relations_evaluation_split_becomes_tasks_with_truths(tmp_path):
    import numpy as np

    from diffusers_delta.data import relation_split
    from diffusers_delta.testing import random_image

    relation = tmp_path / "relation"
    (relation / "add_hat").mkdir(parents=True)
    for index in range(8):
        joined = np.concatenate([np.asarray(random_image(index)), np.asarray(random_image(50 + index))], axis=1)
        PIL.Image.fromarray(joined).save(relation / "add_hat" / f"{index}.png")
    evaluate.main(["--write_relation_tasks", str(tmp_path / "tasks"), "--relation_dir", str(relation)])
    (task,) = evaluate.read_tasks(tmp_path / "tasks")
    exemplar, queries = relation_split(relation).evaluation["add_hat"]
    assert task.name == "add_hat" and [path.stem for path in task.queries] == sorted(p.stem for p in queries)
    assert set(task.truths) == {path.stem for path in task.queries}
    query = np.asarray(PIL.Image.open(task.queries[0]))
    pair = np.asarray(PIL.Image.open(relation / "add_hat" / f"{task.queries[0].stem}.png"))
    assert (query == pair[:, :64]).all()  # the query is its pair's left half, the truth its right half


class _FlakyJudge(BaseHTTPRequestHandler):
    """A judge endpoint that answers `answers` good replies, then HTTP 500 to everything."""

    answers = 0

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).answers -= 1
        if type(self).answers < 0:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"upstream overloaded")
            return
        reply = json.dumps({"choices": [{"message": {"content": "Score: 0 (out of 5)" if type(self).answers % 2
                                                     else "4. Close."}}]})  # fmt: skip
        self.send_response(200)
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def _rows(out):
    return {(row["task"], row["query"]): row for row in csv.DictReader(open(out / "results.csv"))}


def test_a_run_keeps_every_finished_row_records_failures_and_a_rerun_finishes_it(tmp_path, clip_folder, capsys):
    """The judge stops answering after the first task and the last task's query is unreadable: the first task's rows
    are kept, the failures recorded with their reasons, the run goes on; the same command again redoes only those."""
    tasks = tmp_path / "tasks"
    evaluate.main(["--write_toy_tasks", str(tasks), "--toy_edits", "flip", "recolor", "--toy_queries", "2"])
    (tasks / "recolor" / "queries" / "001.png").write_bytes(b"not an image")
    server = HTTPServer(("127.0.0.1", 0), _FlakyJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FlakyJudge.answers = 4  # two questions for each of flip's two queries
    out = tmp_path / "out"
    argv = ["--tasks", str(tasks), "--out", str(out), "--embedder", str(clip_folder), "--no_lpips", "--judge_url",
            f"http://127.0.0.1:{server.server_port}/v1", "--judge_timeout", "5"]  # fmt: skip
    try:
        evaluate.main(argv)
        rows = _rows(out)
        assert [rows[("flip", q)]["status"] for q in ("000.png", "001.png")] == ["ok", "ok"]
        flip = rows[("flip", "000.png")]
        assert flip["judge_content"] == "" and flip["judge_accuracy"] == "4"  # "0 (out of 5)" is not read as 5
        assert "content_consistency answer has no clear 1-5 score" in flip["note"]
        assert "HTTP 500" in rows[("recolor", "000.png")]["status"] and rows[("recolor", "000.png")]["error"] != ""
        assert rows[("recolor", "001.png")]["status"].startswith("failed: query")
        assert "is not a readable image" in rows[("recolor", "001.png")]["status"]
        summary = (out / "summary.md").read_text()
        assert "| all | 2 |" in summary and "2 queries failed" in summary and "recolor/001.png" in summary
        kept = {key: row["clip_i"] for key, row in rows.items() if row["status"] == "ok"}

        _FlakyJudge.answers = 100  # the judge is back; the query is still unreadable
        evaluate.main(argv)
        rows = _rows(out)
        assert len(rows) == 4 and {key: rows[key]["clip_i"] for key in kept} == kept  # done rows kept, not redone
        assert rows[("recolor", "000.png")]["status"] == "ok" and rows[("recolor", "001.png")]["status"] != "ok"
        assert "2 queries were done already" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()


def test_outputs_inside_the_tasks_a_file_for_out_and_no_toy_queries_are_refused_before_loading(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for argv in (["--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "tasks" / "results")],
                 ["--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "tasks")],
                 ["--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "file.txt")],
                 ["--write_toy_tasks", str(tmp_path / "toy"), "--toy_queries", "0"],
                 ["--write_toy_tasks", str(tmp_path / "toy"), "--toy_queries", "-1"]):  # fmt: skip
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
