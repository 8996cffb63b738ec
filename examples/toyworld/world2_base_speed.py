#!/usr/bin/env python
"""Steps per second of toy world 2's base-editor training, with each encoded example used once or reused.

A base-editor step draws a batch of scenes and edits, encodes references and targets with the VAE, and trains the
transformer on them; the encoding costs about as much as the training. `train_base_editor.py --reuse R` encodes a
pool of examples once and serves it R times (`ExamplePool`). This times the script's own pool and step, at the build's
sizes (random weights: the cost does not depend on them), for each `--reuse` value in turn, over whole pools, and
repeats the round `--rounds` times so that a noisy machine slows every setting alike; it prints the median seconds per
step and the speed-up over the first `--reuse` value, and with `--compile` what torch.compile changes on the
transformer's step.

    python examples/toyworld/world2_base_speed.py [--reuse 1 4 8] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_delta.toyworld import world_batch
from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder


sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_base_editor  # noqa: E402
import train_vae  # noqa: E402


def seconds_per_step(transformer, encoder, vae, reuse: int, pool_batches: int, batch_size: int, seed: int) -> float:
    """Trains over one whole pool (`pool_batches * reuse` steps) and returns the mean seconds of a step."""
    optimizer = torch.optim.AdamW([*transformer.parameters(), *encoder.parameters()], lr=1e-4)
    scheduler = train_base_editor.klein_scheduler()
    pool = train_base_editor.ExamplePool(
        lambda rng: world_batch(rng, batch_size, edited_fraction=0.5, instruction_fraction=0.7),
        vae, np.random.default_rng(seed), pool_batches, reuse, seed,
    )  # fmt: skip
    start = time.perf_counter()
    for step in range(pool.steps_per_pool):
        reference_latents, latents, instructions = pool.batch(step)
        generator = torch.Generator().manual_seed(step)
        loss = train_base_editor.flow_matching_step(
            transformer, scheduler, reference_latents, latents, encoder(instructions), generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / pool.steps_per_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 4, 8], help="Reuse values to time.")
    parser.add_argument("--pool_batches", type=int, default=8, help="Batches per pool (the script's default: 64).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds over every setting; medians are printed.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--base_layers", type=int, default=2, help="Double (and single) blocks, as the build's.")
    parser.add_argument("--base_heads", type=int, default=4, help="Attention heads, as the build's.")
    parser.add_argument("--compile", action="store_true", help="Also time the reuse-1 step with torch.compile.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = train_vae.build_vae((32, 64, 64)).eval().requires_grad_(False)  # the world-2 build's VAE
    transformer = train_base_editor.build_transformer(
        vae.config.latent_channels, args.base_layers, args.base_layers, args.base_heads
    ).train()
    encoder = InstructionEncoder(
        prompt_tokens=train_base_editor.PROMPT_TOKENS, prompt_dim=train_base_editor.PROMPT_DIM
    )
    settings = {f"reuse {reuse}": (transformer, reuse) for reuse in args.reuse}
    if args.compile:
        settings["reuse 1, compiled"] = (torch.compile(transformer), 1)
    for model, _ in settings.values():  # warm up (and compile) before timing
        seconds_per_step(model, encoder, vae, 1, 1, args.batch_size, 0)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, (model, reuse) in settings.items():
            times[name].append(
                seconds_per_step(model, encoder, vae, reuse, args.pool_batches, args.batch_size, round_)
            )
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, pools of {args.pool_batches} batches, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| setting | s / step | steps / s | speed-up |")
    print("| --- | --- | --- | --- |")
    reference = statistics.median(times[next(iter(times))])
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {median:.3f} | {1 / median:.2f} | {reference / median:.2f}× |")


if __name__ == "__main__":
    main()
