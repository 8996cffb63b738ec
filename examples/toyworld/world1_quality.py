#!/usr/bin/env python
"""Edit quality in the toy world, where the true edited image of every query is known exactly.

Per edit, on held-out query scenes (seeds never used for training), each edited with its own exemplar pair:

    identity  mean absolute error (0-1) of the unedited query against the truth
    floor     the VAE's reconstruction of the truth against the truth (no 64x64 model can do better)
    output    the edited query against the truth
    gap       (identity - output) / (identity - floor): 0 = no better than leaving the query alone, 1 = the floor

Rows: the base editor told the edit by its own learned text prompt (no adapter: what the base can do when the
instruction is known, seen and unseen edits alike); the shipped adapter; adapters trained without the consistency
loss or with other projections, when a build folder holds them (`--work_dir`, as
examples/toyworld/build_default_model.py leaves it); the adapter after `adapt_to_exemplar(num_steps=20)` on unseen
edits; averaging 3 exemplars instead of 1; a `delta_scale` sweep.

    python examples/toyworld/world1_quality.py [--queries 16] [--work_dir toy-build] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import PIL.Image
import safetensors.torch
import torch

from diffusers_delta import toyworld
from diffusers_delta.evaluation import mean_absolute_error as mae


QUERY_SEED_BASE = 50_000_000  # far from the training pairs' seeds
EXEMPLAR_SEED_BASE = 60_000_000


def held_out(edit_name: str, count: int):
    """(queries, truths) for an edit: PIL images of held-out scenes and their exact edits."""
    edit = toyworld.EDITS[edit_name]
    scenes = [toyworld.generate_scene(np.random.default_rng(QUERY_SEED_BASE + i)) for i in range(count)]
    queries = [PIL.Image.fromarray(toyworld.render(scene)) for scene in scenes]
    truths = [PIL.Image.fromarray(toyworld.render(edit(scene))) for scene in scenes]
    return queries, truths


def exemplars(edit_name: str, query_index: int, count: int = 1) -> list[tuple]:
    """`count` exemplar pairs of an edit for one query: each query has its own, so no one exemplar decides a row."""
    seed = EXEMPLAR_SEED_BASE + 100_000 * list(toyworld.EDITS).index(edit_name) + 10 * query_index
    return [toyworld.make_pair(edit_name, seed + k) for k in range(count)]


@torch.no_grad()
def floor_error(pipe, truths) -> float:
    pixels = torch.stack([torch.from_numpy(np.asarray(t)).permute(2, 0, 1).float() / 127.5 - 1 for t in truths])
    reconstruction = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    return float(((reconstruction + 1) / 2 - (pixels + 1) / 2).abs().mean())


def edit_error(
    pipe, edit_name: str, queries, truths, exemplar_count: int = 1, delta_scale: float = 1.0, prompt_embeds=None
) -> float:
    """Mean error of the queries edited with their own exemplars (`exemplar_count` pairs averaged per query), under
    the empty prompt or `prompt_embeds` (1, L, D_txt)."""
    delta_embeds = torch.cat(
        [pipe.encode_exemplar(exemplars(edit_name, i, exemplar_count)) for i in range(len(queries))]
    )  # (B, N, D_edit)
    generators = [torch.Generator().manual_seed(i) for i in range(len(queries))]
    outputs = pipe(
        queries, delta_embeds=delta_embeds, delta_scale=delta_scale, prompt_embeds=prompt_embeds, generator=generators
    ).images
    return statistics.mean(mae(output, truth) for output, truth in zip(outputs, truths))


def adapted_error(pipe, edit_name: str, queries, truths, num_steps: int) -> float:
    """Mean error of the queries, each edited after `adapt_to_exemplar` on its own exemplar pair."""
    errors = []
    for index, (query, truth) in enumerate(zip(queries, truths)):
        source, target = exemplars(edit_name, index)[0]
        with pipe.adapted_to_exemplar(source, target, num_steps=num_steps, generator=torch.Generator().manual_seed(0)):
            output = pipe(query, exemplar=(source, target), generator=torch.Generator().manual_seed(index)).images[0]
        errors.append(mae(output, truth))
    return statistics.mean(errors)


def gap(identity: float, floor: float, output: float) -> float:
    return (identity - output) / (identity - floor)


def result_cell(row: dict, name: str, identity: dict, floor: dict, missing: str) -> str:
    """ "error (gap)" for an edit in a row of results, or `missing` where the row has no such edit."""
    if name not in row:
        return missing
    return f"{row[name]:.4f} ({gap(identity[name], floor[name], row[name]):+.2f})"


def markdown_table(rows: dict, identity: dict, floor: dict) -> str:
    """The table as markdown: one row per edit, one column per row of results, with gaps in brackets."""
    lines = [
        "| edit | split | identity | floor | " + " | ".join(rows) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in rows) + " |",
    ]
    for name in toyworld.EDITS:
        split = "seen" if name in toyworld.SEEN_EDITS else "unseen"
        cells = [result_cell(row, name, identity, floor, missing="") for row in rows.values()]
        lines.append(f"| {name} | {split} | {identity[name]:.4f} | {floor[name]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("(-", "(\u2212")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(toyworld.DEFAULT_MODEL_DIR))
    parser.add_argument("--work_dir", default=None, help="A build folder with ablation adapters (adapter_*).")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--adapt_steps", type=int, default=20)
    parser.add_argument("--markdown", action="store_true", help="Also print the table as markdown (docs/toyworld.md).")
    args = parser.parse_args()
    if toyworld.model_world(args.model_dir) != toyworld.showcase.WORLD_1:
        parser.error(f"{args.model_dir} holds a toy-world-2 model: measure it with "
                     "examples/toyworld/world2_quality.py --work_dir BUILD; this benchmark needs a world-1 model "
                     "(--model_dir, as examples/toyworld/build_default_model.py --export_dir writes it).")  # fmt: skip

    pipe = toyworld.load_pipeline(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    data = {name: held_out(name, args.queries) for name in toyworld.EDITS}
    identity = {name: statistics.mean(mae(q, t) for q, t in zip(*data[name])) for name in toyworld.EDITS}
    floor = {name: floor_error(pipe, data[name][1]) for name in toyworld.EDITS}

    def evaluate(names, **kwargs) -> dict[str, float]:
        return {name: edit_error(pipe, name, *data[name], **kwargs) for name in names}

    rows = {}
    instructions_file = Path(args.model_dir) / "base" / toyworld.EDIT_PROMPT_EMBEDS_NAME
    if instructions_file.is_file():  # delta_scale 0: the base alone, under the edit's prompt
        instructions = safetensors.torch.load_file(instructions_file)
        rows["base + text prompt"] = {
            name: edit_error(pipe, name, *data[name], delta_scale=0.0, prompt_embeds=instructions[name])
            for name in toyworld.EDITS
        }
    rows["adapter"] = evaluate(toyworld.EDITS)
    for folder in sorted(Path(args.work_dir).glob("adapter_*")) if args.work_dir else []:
        pipe.load_delta_adapter(folder)
        rows[folder.name.removeprefix("adapter_").replace("_", " ")] = evaluate(toyworld.EDITS)
    pipe.load_delta_adapter(Path(args.model_dir) / "adapter")
    rows[f"adapter + adapt_to_exemplar({args.adapt_steps})"] = {
        name: adapted_error(pipe, name, *data[name], args.adapt_steps) for name in toyworld.UNSEEN_EDITS
    }
    rows["adapter, 3 exemplars averaged"] = evaluate(toyworld.EDITS, exemplar_count=3)

    print(f"{args.queries} held-out queries per edit, each with its own exemplar; mean absolute error in [0, 1]; "
          "gap closed = (identity - output) / (identity - floor)\n")  # fmt: skip
    print(f"{'edit':<11} {'split':<7} {'identity':>9} {'floor':>7} " + " ".join(f"{r[:22]:>22}" for r in rows))
    for name in toyworld.EDITS:
        split = "seen" if name in toyworld.SEEN_EDITS else "unseen"
        cells = [result_cell(row, name, identity, floor, missing="-") for row in rows.values()]
        print(
            f"{name:<11} {split:<7} {identity[name]:>9.4f} {floor[name]:>7.4f} " + " ".join(f"{c:>22}" for c in cells)
        )
    print("\nmean gap closed:")
    for label, row in rows.items():
        for split, names in (("seen", toyworld.SEEN_EDITS), ("unseen", toyworld.UNSEEN_EDITS)):
            gaps = [gap(identity[n], floor[n], row[n]) for n in names if n in row]
            if gaps:
                print(f"  {label:<40} {split:<7} {statistics.mean(gaps):+.3f}")
    seen_beaten = all(rows["adapter"][n] < identity[n] for n in toyworld.SEEN_EDITS)
    print(f"\nadapter beats identity on every seen edit: {seen_beaten}")

    print("\ndelta_scale sweep (seen edits, mean output error):")
    for scale in (0.0, 0.5, 1.0, 1.5):
        errors = evaluate(toyworld.SEEN_EDITS, delta_scale=scale).values()
        print(f"  delta_scale {scale:<4} {statistics.mean(errors):.4f}")
    if args.markdown:
        print("\n" + markdown_table(rows, identity, floor))


if __name__ == "__main__":
    main()
