#!/usr/bin/env python
"""Test-time adaptation settings side by side in toy world 2: does `adapt_to_exemplar` help, and never hurt?

For every family of the chosen splits, `--queries` held-out queries, each with its own exemplar pair; each query is
edited zero-shot and after adapting the adapter to its exemplar under each `--setting` (the adapter restored after
each query), on the same queries, noise and exemplars. The question the defaults must answer: adaptation should
raise the unseen splits (S2, S3) and never make a seen edit (S1) worse on average.

    python examples/toyworld/world2_adaptation.py --work_dir toy2 --splits S1 S3 --queries 4 \
        --setting num_steps=20,learning_rate=1e-3 --setting num_steps=20,learning_rate=3e-4,trainable=edit_tokens

A setting is `FIELD=VALUE,...` of `diffusers_delta.adaptation.AdaptationConfig` (unnamed fields keep its defaults;
an empty setting is the defaults). Prints, per split, each setting's mean gap closed beside zero-shot, its change,
and the families it makes worse by more than 0.05; `--markdown` adds a table per family.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import world2_quality
from world2_quality import gap

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.adaptation import parse_setting, setting_name
from diffusers_delta.toyworld import SPLITS


ZERO_SHOT = "zero-shot"
WORSE = 0.05  # a family counts as made worse when adaptation lowers its gap closed by more than this


def main(argv: list[str] | None = None) -> list[tuple[str, str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A world-2 build folder: base/ and adapter/.")
    parser.add_argument("--splits", nargs="+", default=["S1", "S2", "S3"], choices=SPLITS)
    parser.add_argument("--families", nargs="+", default=None, help="Only these families (default: all).")
    parser.add_argument("--queries", type=int, default=4, help="Queries per family, each with its own exemplar.")
    parser.add_argument("--setting", action="append", default=None, help="FIELD=VALUE,... (repeatable).")
    parser.add_argument("--markdown", action="store_true", help="Also print a table per family as markdown.")
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(text) for text in (args.setting or [""])]
    except (TypeError, ValueError) as error:
        parser.error(str(error))

    work = Path(args.work_dir)
    pipe = FluxDeltaEditPipeline.from_pretrained(work / "base")
    pipe.load_delta_adapter(work / "adapter")
    pipe.set_progress_bar_config(disable=True)
    columns = [ZERO_SHOT, *(setting_name(config) for config in settings)]
    table = []  # (split, family, {column: error})
    for split in args.splits:
        for family, cases in world2_quality.cases_of(split, args.queries).items():
            if args.families and family not in args.families:
                continue
            start = time.perf_counter()
            row = {"identity": statistics.mean(world2_quality.mae(c.query, c.truth) for c in cases),
                   "floor": world2_quality.floor_error(pipe, cases)}  # fmt: skip
            row[ZERO_SHOT], _ = world2_quality.run(pipe, cases)
            for name, config in zip(columns[1:], settings):
                row[name] = world2_quality.adapted(pipe, cases, config)
            table.append((split, family, row))
            print(f"{split} {family:<14} " + ", ".join(f"{c} {gap(row, c):+.2f}" for c in columns)
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip

    print("\nmean gap closed per split (change from zero-shot; families made worse by more than 0.05):")
    for split in args.splits:
        rows = [row for s, _, row in table if s == split]
        if not rows:
            continue
        zero_shot = statistics.mean(gap(row, ZERO_SHOT) for row in rows)
        cells = [f"{ZERO_SHOT} {zero_shot:+.2f}"]
        for column in columns[1:]:
            mean = statistics.mean(gap(row, column) for row in rows)
            worse = sum(gap(row, column) < gap(row, ZERO_SHOT) - WORSE for row in rows)
            cells.append(f"{column} {mean:+.2f} ({mean - zero_shot:+.2f}; {worse} of {len(rows)} worse)")
        print(f"  {split}: " + "; ".join(cells))
    if args.markdown:
        print("\n| split | family | identity | floor | " + " | ".join(columns) + " |")
        print("| --- | --- | --- | --- |" + " --- |" * len(columns))
        for split, family, row in table:
            cells = [f"{row[c]:.4f} ({gap(row, c):+.2f})" for c in columns]
            print(f"| {split} | {family} | {row['identity']:.4f} | {row['floor']:.4f} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main()
