"""benchmarks/evaluate.py: toy-world tasks with truths, evaluated end to end with the embedded toy model and a tiny
CLIP saved to a folder; the task layout's mistakes refused before any model loads."""

import csv
import sys
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
