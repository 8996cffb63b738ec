"""`diffusers-delta`: the command line. `demo` shows the embedded toy model at work, offline; `edit` edits a query.

diffusers-delta demo --out demo.png
diffusers-delta edit --exemplar before.png after.png --query query.png --out edited.png [--base ... --adapter ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import PIL.Image
import torch

from . import toyworld
from .grids import make_edit_grid


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    pipe = toyworld.load_pipeline(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    rows, lines = [], []
    for index, name in enumerate(args.edits):
        edit = toyworld.EDITS[name]
        source, target = toyworld.make_pair(edit, seed=args.seed + 2 * index)
        query_scene = toyworld.generate_scene(np.random.default_rng(args.seed + 2 * index + 1))
        query = PIL.Image.fromarray(toyworld.render(query_scene))
        truth = PIL.Image.fromarray(toyworld.render(edit(query_scene)))
        generator = torch.Generator().manual_seed(args.seed)
        output = pipe(query, exemplar=(source, target), generator=generator).images[0]
        rows.append([source, target, query, output, truth])
        identity, error = (
            np.abs(np.asarray(a, float) - np.asarray(truth, float)).mean() / 255 for a in (query, output)
        )
        split = "seen" if name in toyworld.SEEN_EDITS else "unseen"
        lines.append(f"{name:<11} {split:<7} {identity:>9.4f} {error:>9.4f}")
    grid = make_edit_grid(rows, ["exemplar source", "exemplar target", "query", "output", "truth"], cell_size=128)
    grid.save(args.out)
    print(f"{'edit':<11} {'split':<7} {'identity':>9} {'output':>9}   (mean absolute error to the truth, 0-1)")
    print("\n".join(lines))
    print(f"Wrote {args.out} in {time.perf_counter() - start:.1f} s")


def _edit(args: argparse.Namespace) -> None:
    from .pipelines import FluxDeltaEditPipeline

    if args.base is None:
        print("No --base given: using the embedded toy-world model (64x64 scenes).", file=sys.stderr)
        pipe = toyworld.load_pipeline()
        if args.adapter:
            pipe.load_delta_adapter(args.adapter)
    else:
        if args.adapter is None:
            raise SystemExit("--adapter is required with --base.")
        pipe = FluxDeltaEditPipeline.from_pretrained(args.base, text_encoder=None, tokenizer=None)
        pipe.load_delta_adapter(args.adapter)
    source, target = (PIL.Image.open(path) for path in args.exemplar)
    if args.adapt_steps:
        result = pipe.adapt_to_exemplar(source, target, num_steps=args.adapt_steps,
                                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        print(f"Adapted for {args.adapt_steps} steps: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    generator = torch.Generator().manual_seed(args.seed)
    pipe(PIL.Image.open(args.query), exemplar=(source, target), generator=generator).images[0].save(args.out)
    print(f"Wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffusers-delta", description="Edit images by example (Delta-Adapter).")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="Edit toy scenes with the embedded model and write a grid (offline).")
    demo.add_argument("--out", default="delta_demo.png", help="Where to write the grid.")
    demo.add_argument("--edits", nargs="+", default=list(toyworld.EDITS), choices=list(toyworld.EDITS))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model-dir", default=str(toyworld.DEFAULT_MODEL_DIR), help=argparse.SUPPRESS)
    edit = commands.add_parser("edit", help="Apply an exemplar's edit to a query image.")
    edit.add_argument("--exemplar", nargs=2, required=True, metavar=("SOURCE", "TARGET"))
    edit.add_argument("--query", required=True)
    edit.add_argument("--out", required=True)
    edit.add_argument("--base", default=None, help="FLUX.2 [klein] Hub id or folder (default: the toy model).")
    edit.add_argument("--adapter", default=None, help="Delta-Adapter Hub id or folder.")
    edit.add_argument("--adapt-steps", type=int, default=0, help="Test-time adaptation steps first (0: none).")
    edit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"demo": _demo, "edit": _edit}[args.command](args)


if __name__ == "__main__":
    main()
