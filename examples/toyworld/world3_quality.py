#!/usr/bin/env python
"""Edit quality in toy world 3, on edits the adapter never trained on, measured three ways against fair baselines.

Rows: every held-out edit of `edit_space.HELD_OUT_EDITS` (photo edits, and world 2's held-out values that are points of
the space), and `sampled`, fresh draws of the training distribution on evaluation scenes (the zero-shot level the
held-out edits are held to). Each query has its own exemplar, on another scene. Columns:

    told base        the base editor told the edit's parameter vector (no adapter): its ceiling
    nearest exactly  the training edit (of the build's pairs, `--bank` of them) whose result on the exemplar's source
                     is nearest the exemplar's target, applied exactly to the query with pixel operations: what a
                     perfect recogniser of seen edits with a perfect renderer achieves
    adapter          zero-shot, from one exemplar
    pooled           the pooled-MLP ablation (`adapter_pooled_mlp/` of the build, when there)
    world N's model  another toy-world model folder (`--compare`, such as world 2's shipped model), zero-shot on the
                     same cases: whether world 3 beats it, on world 2's held-out values among the rest
    adapted(N)       the adapter after `adapt_to_exemplar(N)` on the exemplar (with --adapt_steps N)
    adapt ...        the same with other settings (each --adapt_setting FIELD=VALUE,... of AdaptationConfig: the
                     guards against overfitting one pair, augment=flip_crop, anchor_weight=..., early_stopping=true)

and three measures for each: the gap closed, (identity - error) / (identity - floor) with mean absolute errors; the
same on the query's shape pixels only (an output that smears the shapes while getting the background right fails it);
and the share of queries whose output beats the exact edit applied to the query with its shapes erased. A row that
wins on the first measure alone is not a success. The distance of each held-out edit to the nearest training edit
(`edit_space.edit_distance` on probe scenes) is given beside it.

    python examples/toyworld/world3_quality.py --work_dir toy3 [--adapter toy3/adapter/checkpoint-3000] [--queries 16]
        [--bank 1000] [--adapt_steps 20]
        [--edits sepia vignette] [--markdown] [--json results.json] [--record record.jsonl] [--grid world3.png]

Prints the table, then issue 30's goals for the shipped model, each met or not. With `--arithmetic`, also edit
arithmetic: compositions of two operations of the training distribution, edited from the composition's own exemplar,
and from one exemplar of each operation, their semantic deltas added (`combine="sum"`) or averaged. With `--record`,
each query's measures are kept as they are taken, and the same command run again (after a session's end) measures
only what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from diffusers_delta import FluxDeltaEditPipeline, toyworld
from diffusers_delta.adaptation import AdaptationConfig, parse_setting, setting_name
from diffusers_delta.atomic_folder import write_image_atomically, write_text_atomically
from diffusers_delta.grids import make_edit_grid
from diffusers_delta.toyworld import edit_space, render, showcase
from diffusers_delta.toyworld.edit_space import EditSpec
from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder
from diffusers_delta.toyworld.scenes import Scene, shape_coverage


SAMPLED = "sampled"
ARITHMETIC = "arithmetic"
#: Where exemplars' scenes start in the evaluation stream, apart from the queries' (0, 1, ...).
EXEMPLAR_OFFSET = 10_000
#: How far apart in the evaluation stream two `--seed`s' draws start (queries and exemplars of one stay apart).
SEED_STRIDE = 100_000


@dataclass
class Case:
    """One query of an edit, with its truth, its own exemplar (another scene) and what the measures need."""

    spec: EditSpec
    query: Scene
    truth: Scene
    exemplar: tuple[Scene, Scene]

    @cached_property
    def images(self) -> dict[str, np.ndarray]:
        return {"query": render(self.query), "truth": render(self.truth)}

    @cached_property
    def exemplar_images(self) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """The exemplar pair as the pipeline takes it."""
        return tuple(to_pil(render(scene)) for scene in self.exemplar)

    @cached_property
    def shape_mask(self) -> np.ndarray:
        """(H, W) bool: the pixels the query's shapes cover, before or after the edit moves them."""
        return shape_coverage(self.query) | shape_coverage(self.truth)

    @cached_property
    def erased_truth(self) -> np.ndarray:
        """The exact edit applied to the query with its shapes erased: what an edit that keeps the change of the
        background and loses the shapes achieves."""
        return render(self.spec.edit()(self.query.with_shapes(())))


def held_out_cases(spec: EditSpec, queries: int, first: int = 0) -> list[Case]:
    """`queries` cases of a held-out edit, from the `first`-th evaluation scene on (its exemplars' apart)."""
    cases = []
    for index in range(first, first + queries):
        query, truth = edit_space.evaluation_pair(spec, index)
        cases.append(Case(spec, query, truth, edit_space.evaluation_pair(spec, EXEMPLAR_OFFSET + index)))
    return cases


def sampled_cases(queries: int, first: int = 0) -> list[Case]:
    """Fresh edits of the training distribution, each on an evaluation query and its own exemplar scene."""
    cases = []
    for index in range(first, first + queries):
        rng = np.random.default_rng([edit_space.EVALUATION_SEED, 5, index])
        spec, query = edit_space.sample_pair(rng)
        exemplar = next(
            scene for scene in (edit_space.generate_family_scene(rng) for _ in range(100))
            if edit_space.visible_change(spec, scene) >= edit_space.MIN_VISIBLE_CHANGE
        )  # fmt: skip
        cases.append(Case(spec, query, spec.edit()(query), (exemplar, spec.edit()(exemplar))))
    return cases


def training_bank(work: Path, count: int) -> list[EditSpec]:
    """The first `count` edits of the build's training pairs (each pair its own edit)."""
    specs = []
    with open(work / "pairs" / "metadata.jsonl", encoding="utf-8") as file:
        for line in file:
            specs.append(EditSpec.from_json(json.loads(line)["spec"]))
            if len(specs) == count:
                break
    return specs


def nearest_exactly(case: Case, bank: list[EditSpec]) -> np.ndarray:
    """The query edited by the bank's edit whose result on the exemplar's source is nearest the exemplar's target."""
    source, target = case.exemplar
    wanted = render(target).astype(np.float64)
    errors = [np.abs(render(spec.edit()(source)) - wanted).mean() for spec in bank]
    return render(bank[int(np.argmin(errors))].edit()(case.query))


def distance_to_bank(spec: EditSpec, bank: list[EditSpec], probes: list[Scene]) -> float:
    return min(edit_space.edit_distance(spec, other, probes) for other in bank)


def to_pil(image: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(image)


def as_array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


@torch.no_grad()
def reconstruction(pipe, image: np.ndarray) -> np.ndarray:
    """The VAE's reconstruction of an image (the floor no output goes below)."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    return ((decoded[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()


def case_measures(output: np.ndarray, case: Case) -> tuple[float, float, float]:
    """One output's (error, error on the shape pixels, 1.0 if it beats the exact edit with the shapes erased)."""
    truth = case.images["truth"].astype(np.float64)
    difference = np.abs(output.astype(np.float64) - truth).mean(axis=-1)  # (H, W)
    error = float(difference.mean() / 255)
    erased = float(np.abs(case.erased_truth.astype(np.float64) - truth).mean() / 255)
    return error, float(difference[case.shape_mask].mean() / 255), float(error < erased)


class Measures:
    """The three measures of one column over the cases of one row."""

    def __init__(self):
        self.errors, self.shape_errors, self.beats_erased = [], [], []

    def append(self, values: tuple[float, float, float]) -> None:
        """One case's measures, as `case_measures` gives them."""
        for values_of_measure, value in zip((self.errors, self.shape_errors, self.beats_erased), values):
            values_of_measure.append(value)

    def summary(self, identity: "Measures", floor: "Measures") -> dict:
        def gap(values, identities, floors):
            room = statistics.mean(identities) - statistics.mean(floors)
            return (statistics.mean(identities) - statistics.mean(values)) / room if room > 0 else float("nan")

        return {
            "error": statistics.mean(self.errors),
            "gap": gap(self.errors, identity.errors, floor.errors),
            "shape_gap": gap(self.shape_errors, identity.shape_errors, floor.shape_errors),
            "beats_erased": statistics.mean(self.beats_erased),
        }


class Record:
    """The measures of every (row, column, query) done so far, one JSON line each, appended as each is measured, so
    that a benchmark cut off (a session's end: 16 queries with adaptation take hours of one core) goes on where it
    stopped when run again with the same `--record`. Its first line says what was measured (the adapters' weights,
    the bank); a record of another run is refused rather than mixed in. A line cut off by a crash is measured again.

    Args:
        path: the record file, or None to keep nothing.
        run: what identifies the run (`run_identity`).
    """

    def __init__(self, path: Path | None, run: dict):
        self.path, self.done = path, {}
        if path is None:
            return
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0]) if lines else None
            if header is not None and header != {"run": run}:
                raise SystemExit(f"error: {path} records another run ({header.get('run')}); pass another --record.")
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run cut off mid-write
                    continue
                self.done[(entry["row"], entry["column"], entry["index"])] = tuple(entry["values"])
            if header is not None:
                return
        write_text_atomically(json.dumps({"run": run}) + "\n", path)

    def measure(self, row: str, column: str, index: int, compute) -> tuple[float, float, float]:
        """The recorded measures of a query, or `compute()`'s, recorded."""
        key = (row, column, index)
        if key not in self.done:
            self.done[key] = compute()
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as file:
                    file.write(json.dumps({"row": row, "column": column, "index": index,
                                           "values": list(self.done[key])}) + "\n")  # fmt: skip
        return self.done[key]


def run_identity(adapter: Path, work: Path, bank: int, compare: Path | None = None) -> dict:
    """What a record's measures depend on: the adapters' and the base's weights (by hash), the bank's size, and the
    compared model's adapter and transformer weights when there is one."""

    def digest(folder: Path) -> str | None:
        weights = folder / "diffusion_pytorch_model.safetensors"
        return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None

    run = {"adapter": digest(adapter), "pooled": digest(work / "adapter_pooled_mlp"),
           "base": digest(work / "base" / "transformer"), "bank": bank}  # fmt: skip
    if compare is not None:
        run["compare"] = [digest(compare / "adapter"), digest(compare / "base" / "transformer")]
    return run


def arithmetic_cases(queries: int, first: int = 0) -> list[tuple[Case, tuple[Scene, Scene], tuple[Scene, Scene]]]:
    """Compositions of two operations drawn from the training distribution: each a case of the composed edit (with
    its own exemplar) and one exemplar of each operation alone, all on different evaluation scenes. A composition
    one of whose parts changes no scene visibly (a faint blur inside a small disc) is drawn again."""
    cases = []
    for index in range(first, first + queries):
        rng = np.random.default_rng([edit_space.EVALUATION_SEED, 6, index])
        scenes = None
        while scenes is None:
            spec = edit_space.sample_edit(rng, geometry_share=0.0)
            if len(spec.operations) < 2:
                continue
            composed = EditSpec(spec.operations[:2])
            parts = [EditSpec(spec.operations[:1]), EditSpec(spec.operations[1:2])]
            # the query, the composition's exemplar, each part's exemplar
            scenes = visible_pairs((composed, composed, *parts), rng)
        cases.append((Case(composed, *scenes[0], scenes[1]), scenes[2], scenes[3]))
    return cases


def visible_pairs(specs, rng: np.random.Generator, attempts: int = 100) -> list[tuple[Scene, Scene]] | None:
    """A scene each spec changes visibly (half `MIN_VISIBLE_CHANGE` at least), with its edit, or None when one of
    them changes none of `attempts` scenes so."""
    pairs = []
    for spec in specs:
        scenes = (edit_space.generate_family_scene(rng) for _ in range(attempts))
        scene = next((s for s in scenes if edit_space.visible_change(spec, s) >= edit_space.MIN_VISIBLE_CHANGE / 2),
                     None)  # fmt: skip
        if scene is None:
            return None
        pairs.append((scene, spec.edit()(scene)))
    return pairs


def measure_arithmetic(editors: "Editors", cases, record: Record, first: int = 0) -> dict:
    """The composed edit from its own exemplar (the adapter column's edit), and from its parts' exemplars added or
    averaged."""
    columns = {name: Measures() for name in ("identity", "floor", "composition's exemplar", "parts, sum",
                                               "parts, mean")}  # fmt: skip

    @torch.no_grad()
    def from_parts(case, index, parts, combine) -> np.ndarray:
        generator = torch.Generator().manual_seed(index)
        output = editors.pipe(to_pil(case.images["query"]), exemplar=parts, combine=combine, generator=generator)
        return as_array(output.images[0])

    for index, (case, *part_pairs) in enumerate(cases, start=first):
        parts = [tuple(to_pil(render(scene)) for scene in pair) for pair in part_pairs]
        outputs = {
            "identity": lambda: editors.output("identity", case, index),
            "floor": lambda: editors.output("floor", case, index),
            "composition's exemplar": lambda: editors.output("adapter", case, index),
            "parts, sum": lambda: from_parts(case, index, parts, "sum"),
            "parts, mean": lambda: from_parts(case, index, parts, "mean"),
        }
        for name, output in outputs.items():
            columns[name].append(record.measure(ARITHMETIC, name, index, lambda: case_measures(output(), case)))
    identity, floor = columns.pop("identity"), columns.pop("floor")
    return {name: m.summary(identity, floor) for name, m in columns.items()} | {
        "identity": statistics.mean(identity.errors), "floor": statistics.mean(floor.errors),
    }  # fmt: skip


def load_pipelines(
    work: Path, adapter: Path | None = None
) -> tuple[FluxDeltaEditPipeline, InstructionEncoder, FluxDeltaEditPipeline | None]:
    pipe = FluxDeltaEditPipeline.from_pretrained(work / "base")
    adapter = adapter or work / "adapter"
    # A training checkpoint holds the adapter alone: its image encoder is the build's.
    encoder_folder = "image_encoder" if (adapter / "image_encoder").is_dir() else (work / "siglip").resolve()
    pipe.load_delta_adapter(adapter, image_encoder_folder=encoder_folder)
    pipe.set_progress_bar_config(disable=True)
    encoder = InstructionEncoder.from_pretrained(work / "base" / "instruction_encoder").eval()
    pooled = None
    if (work / "adapter_pooled_mlp" / "diffusion_pytorch_model.safetensors").is_file():
        pooled = FluxDeltaEditPipeline.from_pretrained(work / "base")
        pooled.load_delta_adapter(work / "adapter_pooled_mlp")
        pooled.set_progress_bar_config(disable=True)
    return pipe, encoder, pooled


@torch.no_grad()
def edit(pipe, case: Case, index: int, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(index)
    output = pipe(to_pil(case.images["query"]), exemplar=case.exemplar_images, generator=generator, **kwargs).images[0]
    return as_array(output)


def adaptation_columns(adapt_steps: int, settings: list[str]) -> dict[str, AdaptationConfig]:
    """The adapted columns: `adapted(N)` with the defaults, then one per setting, named by what it changes."""
    columns = {f"adapted({adapt_steps})": AdaptationConfig(num_steps=adapt_steps)} if adapt_steps else {}
    for text in settings:
        config = parse_setting(text)
        columns[setting_name(config)] = config
    return columns


@dataclass
class Editors:
    """What makes each column's output of a case: the adapter's pipeline, the told base's instruction encoder, the
    pooled-MLP ablation's pipeline (or None), the nearest-edit baseline's bank and the adaptation settings."""

    pipe: FluxDeltaEditPipeline
    encoder: InstructionEncoder
    pooled: FluxDeltaEditPipeline | None
    bank: list[EditSpec]
    adaptations: dict[str, AdaptationConfig]
    compared: dict[str, FluxDeltaEditPipeline] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """Every column measured: the two references (identity, floor), then `shown`."""
        return ["identity", "floor", *self.shown]

    @property
    def shown(self) -> list[str]:
        """The columns of outputs (tables and the grid show these)."""
        pooled = ["pooled"] if self.pooled is not None else []
        return ["told base", "nearest exactly", "adapter", *pooled, *self.compared, *self.adaptations]

    def output(self, column: str, case: Case, index: int) -> np.ndarray:
        """The column's (H, W, 3) output for the case; `index` seeds the noise."""
        if column == "identity":
            return case.images["query"]
        if column == "floor":
            return reconstruction(self.pipe, case.images["truth"])
        if column == "told base":
            prompt = self.encoder(torch.from_numpy(case.spec.vector())[None])
            return edit(self.pipe, case, index, delta_scale=0.0, prompt_embeds=prompt)
        if column == "nearest exactly":
            return nearest_exactly(case, self.bank)
        if column == "adapter":
            return edit(self.pipe, case, index)
        if column == "pooled":
            return edit(self.pooled, case, index)
        if column in self.compared:
            return edit(self.compared[column], case, index)
        adapting = self.pipe.adapted_to_exemplar(*case.exemplar_images, config=self.adaptations[column],
                                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        with torch.enable_grad(), adapting:
            return edit(self.pipe, case, index)


def measure_row(editors: Editors, row: str, cases: list[Case], record: Record, first: int = 0) -> dict:
    """The row's columns over its cases (the `first`-th evaluation draw on), each query's measures taken from
    `record` when it holds them."""
    measures = {name: Measures() for name in editors.columns}
    for index, case in enumerate(cases, start=first):
        for name in editors.columns:
            compute = lambda: case_measures(editors.output(name, case, index), case)  # noqa: E731 (called at once)
            measures[name].append(record.measure(row, name, index, compute))
    identity, floor = measures.pop("identity"), measures.pop("floor")
    return {name: m.summary(identity, floor) for name, m in measures.items()} | {
        "identity": statistics.mean(identity.errors), "floor": statistics.mean(floor.errors),
    }  # fmt: skip


def grid_row(editors: Editors, case: Case, index: int) -> list[PIL.Image.Image]:
    """One case as the grid shows it: the exemplar pair, the query, its truth, then each column's output."""
    images = [*case.exemplar_images, to_pil(case.images["query"]), to_pil(case.images["truth"])]
    return images + [to_pil(editors.output(column, case, index).astype(np.uint8)) for column in editors.shown]


def goals(results: dict) -> list[tuple[str, bool]]:
    """Issue 30's goals for the shipped model, on the held-out rows (nan-free ones)."""
    held = {name: row for name, row in results.items() if name != SAMPLED}
    adapter = [row["adapter"]["gap"] for row in held.values()]
    told = [row["told base"]["gap"] for row in held.values()]
    ratio = statistics.mean(adapter) / statistics.mean(told) if statistics.mean(told) > 0 else float("nan")
    # An edit that leaves the shapes as they are (a frame, a background tone) has no shape-pixel gap (nan).
    shaped = [row for row in held.values() if not math.isnan(row["adapter"]["shape_gap"])]
    shape_positive = sum(row["adapter"]["shape_gap"] > 0 for row in shaped)
    above_nearest = sum(row["adapter"]["gap"] > row["nearest exactly"]["gap"] for row in held.values())
    listed = [
        (f"held-out ratio adapter / told base {ratio:.2f} >= 0.6 (minimum 0.4)", ratio >= 0.6),
        (f"held-out mean zero-shot gap {statistics.mean(adapter):+.2f} >= +0.3", statistics.mean(adapter) >= 0.3),
        (f"shape-pixel gap positive on {shape_positive} of the {len(shaped)} that change shapes (most)",
         shape_positive > len(shaped) / 2),
        (f"above the nearest training edit applied exactly on {above_nearest} of {len(held)} (at least half)",
         above_nearest >= len(held) / 2),
    ]  # fmt: skip
    spatial = [name for name in edit_space.SPATIAL_HELD_OUT if name in held and "pooled" in held[name]]
    if spatial:
        dense = statistics.mean(held[name]["adapter"]["gap"] for name in spatial)
        pooled = statistics.mean(held[name]["pooled"]["gap"] for name in spatial)
        listed.append((f"dense {dense:+.2f} beats pooled {pooled:+.2f} on the spatially weighted held-out edits "
                       "(by more than the run-to-run spread: rerun with another --seed to see it)", dense > pooled))
    adapted = next((key for key in held[next(iter(held))] if key.startswith(("adapted", "adapt "))), None)
    if adapted and SAMPLED in results:
        mean_adapted = statistics.mean(row[adapted]["gap"] for row in held.values())
        trained = results[SAMPLED]["adapter"]["gap"]
        listed.append((f"{adapted} held-out mean {mean_adapted:+.2f} within 0.1 of the training distribution's "
                       f"zero-shot {trained:+.2f} (or above it)", mean_adapted >= trained - 0.1))
        splits = {"held-out": list(held.values()), "training distribution": [results[SAMPLED]]}
        lowered = [name for name, rows in splits.items()
                   if statistics.mean(row[adapted]["gap"] - row["adapter"]["gap"] for row in rows) < 0]
        listed.append((f"{adapted} lowers no split's mean (lowered: {', '.join(lowered) or 'none'})", not lowered))
        hurt = sum(row[adapted]["gap"] < row["adapter"]["gap"] - 0.05 for row in held.values())
        listed.append((f"{adapted} lowers {hurt} of {len(held)} held-out edits by more than 0.05 (at most one in ten)",
                       hurt <= len(held) / 10))
    return listed


def format_table(results: dict, distances: dict, markdown: bool, only: list[str] | None = None) -> str:
    """The results as a table (markdown or aligned text): a row per edit, each column's three measures.

    Args:
        results: row -> column -> measures, as `measure_row` gives them.
        distances: row -> the distance of its edit to the nearest training edit (rows without one: blank).
        markdown: a markdown table, else aligned text.
        only: the columns to show, in that order (default: every one measured).
    """
    columns = [key for key in next(iter(results.values())) if key not in ("identity", "floor")]
    columns = [column for column in only if column in columns] if only else columns
    header = ["edit", "distance", "identity", "floor"] + [f"{c} (gap / shapes / beats erased)" for c in columns]
    rows = []
    for name, row in results.items():
        cells = [name, f"{distances[name]:.3f}" if name in distances else "", f"{row['identity']:.3f}",
                 f"{row['floor']:.3f}"]  # fmt: skip
        cells += [f"{row[c]['gap']:+.2f} / {row[c]['shape_gap']:+.2f} / {row[c]['beats_erased']:.0%}" for c in columns]
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A build of build_world3.py (base/, adapter/, pairs/).")
    parser.add_argument("--adapter", default=None,
                        help="Measure this adapter folder instead of the build's (e.g. adapter/checkpoint-3000).")
    parser.add_argument("--queries", type=int, default=16, help="Queries per edit, each with its own exemplar.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Which evaluation draw: another seed measures other scenes and noise (the spread between "
                        "two seeds is the run-to-run spread a difference must exceed).")  # fmt: skip
    parser.add_argument("--bank", type=int, default=1000, help="Training edits the nearest-edit baseline searches.")
    parser.add_argument("--adapt_steps", type=int, default=0, help="Also adapt to each exemplar this many steps.")
    parser.add_argument("--adapt_setting", action="append", default=[],
                        help="Also adapt with this AdaptationConfig setting: FIELD=VALUE,... (repeatable).")
    parser.add_argument("--edits", nargs="+", default=None, choices=sorted(edit_space.HELD_OUT_EDITS),
                        help="Held-out edits to measure (default: every one).")  # fmt: skip
    parser.add_argument("--no_sampled", action="store_true", help="Leave out the training distribution's row.")
    parser.add_argument("--arithmetic", action="store_true",
                        help="Also measure edit arithmetic on compositions of two operations.")  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="Print the table as markdown.")
    parser.add_argument("--table_columns", nargs="+", default=None,
                        help="The columns the table shows, in order (default: all; the JSON keeps all), e.g. "
                        "'told base' 'nearest exactly' adapter 'adapted(20)' for the README's.")  # fmt: skip
    parser.add_argument("--json", default=None, help="Also write the results here.")
    parser.add_argument("--compare", default=None,
                        help="Also edit every case with this toy-world model folder (base/, adapter/: world 2's "
                        "shipped model, say), zero-shot, as a column of its own.")  # fmt: skip
    parser.add_argument("--grid", default=None,
                        help="Also write a PNG: each row's first query, its exemplar and truth, and every column's "
                        "output.")  # fmt: skip
    parser.add_argument("--record", default=None,
                        help="Record each query's measures in this file as they are taken; run again with the same "
                        "file, a benchmark cut off goes on where it stopped.")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("queries", "bank"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    try:
        args.adaptations = adaptation_columns(args.adapt_steps, args.adapt_setting)
    except (ValueError, TypeError) as error:
        parser.error(f"--adapt_setting: {error}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir)
    adapter = Path(args.adapter) if args.adapter else work / "adapter"
    pipe, encoder, pooled = load_pipelines(work, adapter)
    compared = {}
    if args.compare:
        other = toyworld.load_pipeline(args.compare)
        other.set_progress_bar_config(disable=True)
        compared[f"world {showcase.WORLD_NUMBERS[toyworld.model_world(args.compare)]}'s model"] = other
    run = run_identity(adapter, work, args.bank, args.compare and Path(args.compare))
    record = Record(args.record and Path(args.record), run)
    bank = training_bank(work, args.bank)
    first = args.seed * SEED_STRIDE  # the evaluation draw's first index
    probes = edit_space.probe_scenes(2)
    names = args.edits or list(edit_space.HELD_OUT_EDITS)
    editors = Editors(pipe, encoder, pooled, bank, args.adaptations, compared)
    rows = {name: held_out_cases(edit_space.HELD_OUT_EDITS[name], args.queries, first) for name in names}
    rows |= {} if args.no_sampled else {SAMPLED: sampled_cases(args.queries, first)}
    results, distances = {}, {}
    for name, cases in rows.items():
        if name != SAMPLED:
            distances[name] = distance_to_bank(edit_space.HELD_OUT_EDITS[name], bank, probes)
        results[name] = measure_row(editors, name, cases, record, first)
        print(f"{name}: adapter gap {results[name]['adapter']['gap']:+.2f}", flush=True)
    print(format_table(results, distances, args.markdown, args.table_columns))
    if args.grid:
        titles = ["exemplar source", "exemplar target", "query", "truth", *editors.shown]
        grid = make_edit_grid([grid_row(editors, cases[0], first) for cases in rows.values()], titles, cell_size=96,
                              row_labels=list(rows), row_label_width=150)  # fmt: skip
        write_image_atomically(grid, Path(args.grid))
        print(f"Wrote {args.grid}")
    for line, met in goals(results):
        print(f"{'met    ' if met else 'NOT MET'}  {line}")
    report = {"results": results, "distances": distances}
    if args.arithmetic:
        report["arithmetic"] = measure_arithmetic(editors, arithmetic_cases(args.queries, first), record, first)
        print("\nEdit arithmetic (compositions of two operations):")
        print(format_table({"composition": report["arithmetic"]}, {}, args.markdown))
    if args.json:
        write_text_atomically(json.dumps(report, indent=1), Path(args.json))
    return report


if __name__ == "__main__":
    main()
