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

Nothing computed is lost: each row is appended to `results.csv` as its query finishes; a query that fails (an
unreadable image, a judge that stops answering) is recorded with `status` "failed: why" and the run goes on, and the
summary lists what failed. Run the same command again to finish: rows already done are kept and skipped, failed ones
are tried again. A judge answer without a clear 1-5 score is left blank and said so in `note`, never guessed.

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
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from diffusers_delta import toyworld
from diffusers_delta.atomic_folder import write_image_atomically, write_text_atomically
from diffusers_delta.cli import load_edit_pipeline
from diffusers_delta.data import IMAGE_SUFFIXES, relation_split, split_side_by_side
from diffusers_delta.evaluation import (
    ImageEmbedder,
    JudgeError,
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
           "identity_error", "gap_closed", "status", "note"]  # fmt: skip
MEASURES = COLUMNS[2:10]
#: What a query's edit could not survive: the run records it as failed and goes on.
QUERY_FAILURES = (OSError, ValueError, JudgeError)


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


def evaluate_task(
    pipe, task: Task, embedder, lpips, judge, seed: int, call_kwargs: dict, done: set[tuple[str, str]] = frozenset()
) -> Iterator[tuple[dict, list | None]]:
    """Edits and measures every query of `task` not in `done` -> (row, grid row) for each as it finishes. A query
    that fails (or every query, when the exemplar cannot be read) gives a row whose `status` says why, and no grid
    row; a judge answer without a clear score leaves its column blank and says so in `note`."""
    queries = [path for path in task.queries if (task.name, path.name) not in done]
    if not queries:
        return
    side = pipe.config.get("image_size")
    try:
        source, target = fit_to_model_size(side, [read_image_file(task.source, "exemplar source"),
                                                  read_image_file(task.target, "exemplar target")])  # fmt: skip
        tokens = pipe.encode_exemplar((source, target))
    except QUERY_FAILURES as error:
        for path in queries:
            yield {"task": task.name, "query": path.name, "status": f"failed: {_one_line(error)}"}, None
        return
    for path in queries:
        row = {"task": task.name, "query": path.name, "status": "ok"}
        try:
            query = fit_to_model_size(side, [read_image_file(path, "query")])[0]
            truth_path = task.truths.get(path.stem)
            truth = read_image_file(truth_path, "truth") if truth_path is not None else None
        except QUERY_FAILURES as error:
            yield {**row, "status": f"failed: {_one_line(error)}"}, None
            continue
        generator = torch.Generator(pipe._execution_device).manual_seed(seed)
        edit = pipe(query, delta_embeds=tokens, generator=generator, **call_kwargs).images[0]
        row["clip_i"] = float(clip_image_similarity(embedder, [query], [edit])[0])
        row["directional"] = float(directional_similarity(embedder, [query], [edit], [source], [target])[0])
        row["lpips"] = float(lpips([query], [edit])[0]) if lpips is not None else None
        if truth is not None:
            row["error"], row["identity_error"] = _mean_error(edit, truth), _mean_error(query, truth)
            if row["identity_error"] > 0:
                row["gap_closed"] = 1 - row["error"] / row["identity_error"]
        if judge is not None:
            try:
                scores = judge.score(source, target, query, edit)
            except JudgeError as error:
                row["status"] = f"failed: {_one_line(error)}"
            else:
                row["judge_content"], row["judge_accuracy"] = scores.content_consistency, scores.edit_accuracy
                unclear = {name: scores.answers[name] for name in scores.unparsable()}
                if unclear:
                    row["note"] = "; ".join(f"judge's {name} answer has no clear 1-5 score: {answer[:80]!r}"
                                            for name, answer in unclear.items())  # fmt: skip
        yield row, [source, target, query, edit] + ([truth.resize(edit.size)] if truth is not None else [])


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def summarize(rows: list[dict]) -> str:
    """Per-task and overall means of every measure present over the finished rows, as a markdown table, then what
    failed."""
    finished = [row for row in rows if _finished(row)]
    measures = [c for c in MEASURES if any(row.get(c) not in (None, "") for row in finished)]
    groups = {}
    for row in finished:
        groups.setdefault(row["task"], []).append(row)
    groups["all"] = finished

    def mean(group, column):
        values = [float(row[column]) for row in group if row.get(column) not in (None, "")]
        return f"{sum(values) / len(values):.3f}" if values else ""

    lines = ["| task | queries | " + " | ".join(measures) + " |", "|" + " --- |" * (len(measures) + 2)]
    for name, group in groups.items():
        lines.append(f"| {name} | {len(group)} | " + " | ".join(mean(group, c) for c in measures) + " |")
    failed = [row for row in rows if not _finished(row)]
    if failed:
        lines += ["", f"{len(failed)} queries failed (run the same command again to retry them):"]
        lines += [f"- {row['task']}/{row['query']}: {row['status'].removeprefix('failed: ')}" for row in failed]
    return "\n".join(lines) + "\n"


def _finished(row: dict) -> bool:
    return row.get("status") in (None, "", "ok")  # a table written before `status` holds finished rows only


def read_results(path: Path) -> dict[tuple[str, str], dict]:
    """The rows of an earlier run's `results.csv` by (task, query), the last of each (an empty dict for none)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as file:
        return {(row["task"], row["query"]): row for row in csv.DictReader(file) if row.get("task")}


def _csv_row(row: dict) -> dict:
    return {c: ("" if row.get(c) is None else row[c]) for c in COLUMNS}


def write_results(path: Path, rows: list[dict]) -> None:
    """`results.csv` whole, one row per query (atomically: an earlier table stays until this one is complete)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(_csv_row(row) for row in rows)
    write_text_atomically(buffer.getvalue(), path)


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
    parser.add_argument("--judge_timeout", type=float, default=120.0, help="Seconds to wait for each judge answer.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Denoising steps (the pipeline's).")
    parser.add_argument("--delta_scale", type=float, default=1.0, help="The edit strength.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed of every edit.")
    parser.add_argument("--write_toy_tasks", default=None, help="Write toy-world tasks (with truths) here, and stop.")
    parser.add_argument("--toy_edits", nargs="+", default=None, help="Their edits (default: the demo's).")
    parser.add_argument("--toy_queries", type=_positive_int, default=4, help="Queries per toy task.")
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
    if args.judge_timeout <= 0:
        parser.error("--judge_timeout must be a positive number of seconds.")
    if args.tasks is not None:
        out, tasks = Path(args.out).resolve(), Path(args.tasks).resolve()
        if out.exists() and not out.is_dir():
            parser.error(f"--out {args.out} is a file: give a folder for results.csv, summary.md and grids/.")
        if out == tasks or out.is_relative_to(tasks):
            parser.error(f"--out {args.out} is inside --tasks {args.tasks}: its outputs would be read as a task on "
                         "the next run; give a folder outside it.")  # fmt: skip
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        judge = VLMJudge(
            args.judge_url, args.judge_model, os.environ.get("OPENAI_API_KEY"), timeout=args.judge_timeout, **prompts
        )
    call_kwargs = {"delta_scale": args.delta_scale}
    if args.num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = args.num_inference_steps

    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    earlier = read_results(results)
    done = {key for key, row in earlier.items() if _finished(row)}
    write_results(results, list(earlier.values()))  # in today's columns, before rows are appended to it
    rows = dict(earlier)
    with open(results, "a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        for task in tasks:
            grid = []
            for row, grid_row in evaluate_task(pipe, task, embedder, lpips, judge, args.seed, call_kwargs, done):
                writer.writerow(_csv_row(row))
                file.flush()  # a row written is a row kept, whatever happens next
                rows[(row["task"], row["query"])] = row
                if grid_row is not None:
                    grid.append(grid_row)
            if grid:
                labels = ["exemplar source", "exemplar target", "query", "output"]
                labels += ["truth"] if len(grid[0]) > 4 else []
                write_image_atomically(make_edit_grid(grid, labels, cell_size=128), out / "grids" / f"{task.name}.png")
    order = {(task.name, path.name): index for index, (task, path) in
             enumerate((task, path) for task in tasks for path in task.queries)}  # fmt: skip
    final = sorted(rows.values(), key=lambda row: order.get((row["task"], row["query"]), len(order)))
    write_results(results, final)  # one row per query, failed ones replaced by their retries
    summary = summarize(final)
    write_text_atomically(summary, out / "summary.md")
    print(summary)
    skipped = f"; {len(done)} queries were done already" if done else ""
    print(f"Wrote {results}, {out / 'summary.md'} and the grids in {out / 'grids'}{skipped}")


if __name__ == "__main__":
    main()
