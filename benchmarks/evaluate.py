#!/usr/bin/env python
"""Evaluate a Delta-Adapter on a folder of editing tasks, as the paper measures it, and write a table and grids.

A task is an exemplar pair and the queries to edit its way; where the true edit of a query is known (the toy world),
it is a truth-based measure too:

    tasks/TASK/source.png  target.png       the exemplar pair (any image suffix)
    tasks/TASK/queries/NAME.png             the images to edit
    tasks/TASK/truths/NAME.png              optional: each query edited exactly (the toy world writes them)

Per query: CLIP-I and LPIPS between the query and its edit (content), the directional similarity of the edit to the
exemplar's (edit accuracy), the judge's two 5-point scores when `--judge_url` is given, and with a truth the mean
absolute error of the edit and of the unedited query to it ("gap closed" = 1 − error / identity error). Written to
`--out`: `results.csv` (one row per query), `summary.md` (per task and overall means) and `grids/TASK.png`.

    python benchmarks/evaluate.py --tasks my-tasks/ --base black-forest-labs/FLUX.2-klein-4B --adapter path/to/adapter
    python benchmarks/evaluate.py --write_toy_tasks toy-tasks/ && python benchmarks/evaluate.py --tasks toy-tasks/

Relation252K's seen-task evaluation (each task's exemplar and 5 queries, by the seeded rule of
`diffusers_delta.data.relation_split`, which `train_delta_adapter.py --hold_out_relation_evaluation` leaves out of
training; the queries' true edits are their pairs' right halves):

    python benchmarks/evaluate.py --write_relation_tasks relation-tasks/ --relation_dir Relation252K/
    python benchmarks/evaluate.py --tasks relation-tasks/ --base ... --adapter ...
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from diffusers_delta import toyworld
from diffusers_delta.cli import load_edit_pipeline
from diffusers_delta.data import IMAGE_SUFFIXES, relation_split, split_side_by_side
from diffusers_delta.evaluation import (
    ImageEmbedder,
    LPIPSMetric,
    MetricUnavailable,
    VLMJudge,
    clip_image_similarity,
    directional_similarity,
    mean_absolute_error,
)
from diffusers_delta.grids import make_edit_grid
from diffusers_delta.image_inputs import fit_to_model_size, read_image_file
from diffusers_delta.toyworld import showcase


COLUMNS = ["task", "query", "clip_i", "directional", "lpips", "judge_content", "judge_accuracy", "error",
           "identity_error", "gap_closed"]  # fmt: skip


@dataclass
class Task:
    """An exemplar pair and its queries (with their true edits, where known)."""

    name: str
    source: Path
    target: Path
    queries: list[Path]
    truths: dict[str, Path] = field(default_factory=dict)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def _one(folder: Path, stem: str) -> Path:
    found = [p for p in _images(folder) if p.stem == stem]
    if len(found) != 1:
        raise ValueError(f"{folder} needs exactly one {stem} image (found {len(found)}): see the task layout.")
    return found[0]


def read_tasks(root: str | Path) -> list[Task]:
    """The tasks of a folder laid out as the module docstring shows, sorted by name."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    tasks = []
    for folder in folders:
        queries = _images(folder / "queries")
        if not queries:
            raise ValueError(f"{folder} has no queries/ images: see the task layout (python {__file__} --help).")
        truths = {p.stem: p for p in _images(folder / "truths")}
        tasks.append(Task(folder.name, _one(folder, "source"), _one(folder, "target"), queries, truths))
    if not tasks:
        raise ValueError(f"{root} holds no task folders: see the task layout (python {__file__} --help).")
    return tasks


def _write_task(folder: Path, source, target, queries: list[tuple[str, PIL.Image.Image, PIL.Image.Image]]) -> None:
    """One task folder in the layout above: its exemplar, and (name, query, truth) for each query."""
    (folder / "queries").mkdir(parents=True, exist_ok=True)
    (folder / "truths").mkdir(exist_ok=True)
    source.save(folder / "source.png")
    target.save(folder / "target.png")
    for name, query, truth in queries:
        query.save(folder / "queries" / f"{name}.png")
        truth.save(folder / "truths" / f"{name}.png")


def write_toy_tasks(root: str | Path, edits: list[str], queries_per_task: int, seed: int = 0) -> None:
    """Toy-world tasks with their truths: one task per edit (a name `toyworld.make_pair` takes, of either world), its
    exemplar and its queries with their truths drawn from `seed`."""
    for index, name in enumerate(edits):
        first = seed + 1000 * index
        queries = [(f"{n:03d}", *toyworld.make_pair(name, seed=first + 1 + n)) for n in range(queries_per_task)]
        _write_task(Path(root) / name, *toyworld.make_pair(name, seed=first), queries)


def shipped_demo_edits() -> list[str]:
    """The embedded model's demo edits, each once: the default toy tasks."""
    return list(dict.fromkeys(name for name, _ in showcase.DEMO_ROWS[toyworld.model_world()]))


def write_relation_tasks(root: str | Path, relation_dir: str | Path, seed: int = 0, queries_per_task: int = 5) -> int:
    """Relation's evaluation split as task folders: each task's exemplar pair, its queries (left halves) and their
    truths (right halves) -> the number of tasks written."""
    split = relation_split(relation_dir, seed, queries_per_task)
    for task, (exemplar, queries) in split.evaluation.items():
        halves = [(path.stem, *split_side_by_side(read_image_file(path, "query pair"))) for path in queries]
        _write_task(Path(root) / task, *split_side_by_side(read_image_file(exemplar, "exemplar")), halves)
    return len(split.evaluation)


def _mean_error(image: PIL.Image.Image, truth: PIL.Image.Image) -> float:
    """The toy-world measure (`mean_absolute_error`), the truth at the image's size."""
    return mean_absolute_error(image, truth.resize(image.size, PIL.Image.BICUBIC))


def evaluate_task(pipe, task: Task, embedder, lpips, judge, seed: int, call_kwargs: dict) -> tuple[list[dict], list]:
    """Edits every query of `task` and measures it -> (rows, grid rows)."""
    side = pipe.config.get("image_size")
    source, target = fit_to_model_size(side, [read_image_file(task.source, "exemplar source"),
                                              read_image_file(task.target, "exemplar target")])  # fmt: skip
    tokens = pipe.encode_exemplar((source, target))
    rows, grid = [], []
    for path in task.queries:
        query = fit_to_model_size(side, [read_image_file(path, "query")])[0]
        generator = torch.Generator(pipe._execution_device).manual_seed(seed)
        edit = pipe(query, delta_embeds=tokens, generator=generator, **call_kwargs).images[0]
        row = {"task": task.name, "query": path.name}
        row["clip_i"] = float(clip_image_similarity(embedder, [query], [edit])[0])
        row["directional"] = float(directional_similarity(embedder, [query], [edit], [source], [target])[0])
        row["lpips"] = float(lpips([query], [edit])[0]) if lpips is not None else None
        if judge is not None:
            scores = judge.score(source, target, query, edit)
            row["judge_content"], row["judge_accuracy"] = scores.content_consistency, scores.edit_accuracy
        truth_path = task.truths.get(path.stem)
        if truth_path is not None:
            truth = read_image_file(truth_path, "truth")
            row["error"], row["identity_error"] = _mean_error(edit, truth), _mean_error(query, truth)
            if row["identity_error"] > 0:
                row["gap_closed"] = 1 - row["error"] / row["identity_error"]
        rows.append(row)
        grid.append([source, target, query, edit] + ([truth.resize(edit.size)] if truth_path is not None else []))
    return rows, grid


def summarize(rows: list[dict]) -> str:
    """Per-task and overall means of every measure present, as a markdown table."""
    measures = [c for c in COLUMNS[2:] if any(row.get(c) is not None for row in rows)]
    groups = {}
    for row in rows:
        groups.setdefault(row["task"], []).append(row)
    groups["all"] = rows

    def mean(group, column):
        values = [row[column] for row in group if row.get(column) is not None]
        return f"{sum(values) / len(values):.3f}" if values else ""

    lines = ["| task | queries | " + " | ".join(measures) + " |", "|" + " --- |" * (len(measures) + 2)]
    for name, group in groups.items():
        lines.append(f"| {name} | {len(group)} | " + " | ".join(mean(group, c) for c in measures) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="The task folder (see the layout above).")
    parser.add_argument("--out", default="evaluation", help="Where results.csv, summary.md and grids/ go.")
    parser.add_argument("--base", default=None, help="The base pipeline (default: the embedded toy model).")
    parser.add_argument("--adapter", default=None, help="The adapter (required with --base).")
    parser.add_argument(
        "--embedder", default="openai/clip-vit-large-patch14", help="CLIP or SigLIP for CLIP-I and directions."
    )
    parser.add_argument("--no_lpips", action="store_true", help="Skip LPIPS.")
    parser.add_argument("--judge_url", default=None, help="An OpenAI-compatible endpoint for the 5-point scores.")
    parser.add_argument("--judge_model", default="gpt-4o", help="The judge's model name at that endpoint.")
    parser.add_argument("--judge_prompts", default=None, help="A JSON file of the judge's prompts (default: ours).")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Denoising steps (the pipeline's).")
    parser.add_argument("--delta_scale", type=float, default=1.0, help="The edit strength.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed of every edit.")
    parser.add_argument("--write_toy_tasks", default=None, help="Write toy-world tasks (with truths) here, and stop.")
    parser.add_argument("--toy_edits", nargs="+", default=None, help="Their edits (default: the demo's).")
    parser.add_argument("--toy_queries", type=int, default=4, help="Queries per toy task.")
    parser.add_argument(
        "--write_relation_tasks", default=None, help="Write Relation's evaluation tasks here, and stop."
    )
    parser.add_argument("--relation_dir", default=None, help="Relation252K's folder (TASK/NAME.jpg side by side).")
    parser.add_argument("--split_seed", type=int, default=0, help="The split's seed (as the training script's).")
    parser.add_argument("--queries_per_task", type=int, default=5, help="Evaluation queries per Relation task.")
    args = parser.parse_args(argv)
    if args.write_toy_tasks is None and args.write_relation_tasks is None and args.tasks is None:
        parser.error("Give --tasks (a task folder), or --write_toy_tasks / --write_relation_tasks to make one.")
    if args.write_relation_tasks and not args.relation_dir:
        parser.error("--write_relation_tasks needs --relation_dir, Relation252K's folder.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_toy_tasks:
        args.toy_edits = args.toy_edits or shipped_demo_edits()
        write_toy_tasks(args.write_toy_tasks, args.toy_edits, args.toy_queries, args.seed)
        print(f"Wrote {len(args.toy_edits)} toy-world tasks to {args.write_toy_tasks}")
        return
    if args.write_relation_tasks:
        count = write_relation_tasks(
            args.write_relation_tasks, args.relation_dir, args.split_seed, args.queries_per_task
        )
        print(f"Wrote {count} Relation evaluation tasks to {args.write_relation_tasks}")
        return
    tasks = read_tasks(args.tasks)  # checked before any model loads
    pipe = load_edit_pipeline(args.base, args.adapter, "cuda" if torch.cuda.is_available() else None)
    pipe.set_progress_bar_config(disable=True)
    embedder = ImageEmbedder.from_pretrained(args.embedder)
    lpips = None
    if not args.no_lpips:
        try:
            lpips = LPIPSMetric()
        except MetricUnavailable as error:
            print(error)
    judge = None
    if args.judge_url:
        prompts = {"prompts": args.judge_prompts} if args.judge_prompts else {}
        judge = VLMJudge(args.judge_url, args.judge_model, os.environ.get("OPENAI_API_KEY"), **prompts)
    call_kwargs = {"delta_scale": args.delta_scale}
    if args.num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = args.num_inference_steps

    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks:
        task_rows, grid = evaluate_task(pipe, task, embedder, lpips, judge, args.seed, call_kwargs)
        rows += task_rows
        labels = ["exemplar source", "exemplar target", "query", "output"] + (["truth"] if len(grid[0]) > 4 else [])
        make_edit_grid(grid, labels, cell_size=128).save(out / "grids" / f"{task.name}.png")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: ("" if row.get(c) is None else row[c]) for c in COLUMNS} for row in rows)
    summary = summarize(rows)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    print(f"Wrote {out / 'results.csv'}, {out / 'summary.md'} and {len(tasks)} grids in {out / 'grids'}")


if __name__ == "__main__":
    main()
