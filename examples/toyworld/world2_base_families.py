#!/usr/bin/env python
"""What one edit family costs toy world 2's base editor, when nothing else competes for the model.

The base editor of a world-2 build learns every family (17, and 6 compositions) at once, about one training example
per family per step, and after a build's 6000 or 9000 steps still cannot do several of them when told. This trains
the same architecture on the given families only, one run per family, and prints the family's gap closed under the
true instruction, (identity - output) / (identity - floor), every `--eval_every` steps: if a family alone is learned
in a few hundred steps, the full base editor is short of steps per family, not of a way to represent the edit.

    python examples/toyworld/world2_base_families.py --work_dir toy2 [--families flip recolor] [--steps 1000]
        [--from_base]

A fresh transformer by default (the build's architecture), or with `--from_base` the build's base editor, trained
further. Each run trains its family's every parameter value (every split: the base knows them all, as klein knows every
edit by text) on plain scenes, with `--instruction_fraction` of the references edited and the rest reproduced.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

from diffusers_delta.backbones.flux2 import encode_latents
from diffusers_delta.toyworld import FAMILIES, SPLITS, split_edits, world_batch
from diffusers_delta.toyworld.families import edits_by_family
from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder


sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_base_editor  # noqa: E402


EVAL_SEED = 10_000  # the build's base-editor report draws its held-out scenes from here too


def train_family(args: argparse.Namespace, family: str, vae: AutoencoderKLFlux2) -> list[tuple[int, float, float]]:
    """Trains on one family and returns (step, gap closed, seconds of training so far) at every evaluation."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    base = Path(args.work_dir) / "base"
    if args.from_base:
        transformer = Flux2Transformer2DModel.from_pretrained(base / "transformer")
        encoder = InstructionEncoder.from_pretrained(base / "instruction_encoder")
    else:
        built = Flux2Transformer2DModel.load_config(base / "transformer")
        transformer = train_base_editor.build_transformer(
            vae.config.latent_channels, built["num_layers"], built["num_single_layers"], built["num_attention_heads"]
        )
        encoder = InstructionEncoder(
            prompt_tokens=train_base_editor.PROMPT_TOKENS, prompt_dim=train_base_editor.PROMPT_DIM
        )
    transformer.train().requires_grad_(True)
    encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*transformer.parameters(), *encoder.parameters()], lr=args.learning_rate)
    training_scheduler = train_base_editor.klein_scheduler()
    pipe = Flux2KleinPipeline(
        scheduler=train_base_editor.klein_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
        transformer=transformer, is_distilled=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    edits = [edit for split in SPLITS for edit in edits_by_family(split_edits(split)).get(family, [])]

    def evaluate() -> float:
        transformer.eval()
        *_, gap = train_base_editor.gap_under_instruction(pipe, encoder, edits, EVAL_SEED, args.queries)
        transformer.train()
        return gap

    results, trained_seconds = [(0, evaluate(), 0.0)], 0.0
    print(f"{family:<12} step     0: gap closed {results[0][1]:+.2f}", flush=True)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        references, targets, instructions = world_batch(
            rng, args.batch_size, edited_fraction=0.0, instruction_fraction=args.instruction_fraction,
            families=(family,),
        )  # fmt: skip
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        reference_latents, latents = encode_latents(vae, torch.cat([references, targets])).chunk(2)  # (B, 4C, h, w)
        loss = train_base_editor.flow_matching_step(
            transformer, training_scheduler, reference_latents, latents, encoder(instructions), generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        trained_seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            results.append((step, evaluate(), trained_seconds))
            print(
                f"{family:<12} step {step:>5}: gap closed {results[-1][1]:+.2f} ({trained_seconds:.0f} s)", flush=True
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A world-2 build folder (its vae/ and base/).")
    parser.add_argument("--families", nargs="+", default=["flip", "recolor"], choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=1000, help="Training steps per family.")
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--from_base", action="store_true", help="Go on training the build's base editor instead.")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--instruction_fraction", type=float, default=0.8)
    parser.add_argument("--queries", type=int, default=8, help="Held-out scenes per evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    vae = AutoencoderKLFlux2.from_pretrained(Path(args.work_dir) / "vae").eval().requires_grad_(False)
    table = {family: train_family(args, family, vae) for family in args.families}
    start = "the build's base editor" if args.from_base else "a fresh transformer"
    print(f"\ngap closed under the true instruction, one family at a time, from {start}:")
    print("| family | " + " | ".join(f"step {step}" for step, _, _ in next(iter(table.values()))) + " |")
    print("| --- |" + " --- |" * len(next(iter(table.values()))))
    for family, results in table.items():
        print(f"| {family} | " + " | ".join(f"{gap:+.2f}" for _, gap, _ in results) + " |")


if __name__ == "__main__":
    main()
