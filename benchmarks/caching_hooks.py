#!/usr/bin/env python
"""Which of diffusers' caching hooks are safe with an exemplar edit, measured on the embedded toy-world model.

Every hook of `transformer.enable_cache` is put on the toy model's transformer in turn (Delta-Adapter loaded), and
the same edits are made with it and without: one edit per family of the model's world, on `--seeds` scenes each, at
`--steps` denoising steps (more than the model's 4, so that the hooks have steps to skip). For each hook it prints
how much of the gap between the unedited query and the true edit the outputs close (1: the true edit, 0: the query
unchanged), that against no hook, the wall time against no hook (interleaved, medians), or the error a hook raises.
A hook is safe with an exemplar edit when it keeps the gap closed within a few hundredths of no hook.

    python benchmarks/caching_hooks.py [--steps 12] [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.hooks import PyramidAttentionBroadcastConfig

from diffusers_delta import toyworld
from diffusers_delta.toyworld import showcase


def hooks(pipe, steps: int) -> dict:
    """Each caching hook as a user would first set it for a `steps`-step FLUX.2 edit."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "none": None,
        "TaylorSeer (interval 2)": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2),
        "PyramidAttentionBroadcast (every 2nd)": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep,
        ),  # fmt: skip
        "MagCache (uncalibrated, ratios 1)": MagCacheConfig(num_inference_steps=steps, mag_ratios=np.ones(steps)),
        "TextKV": TextKVCacheConfig(),
        "SeaCache": SeaCacheConfig(),
        "FirstBlockCache": FirstBlockCacheConfig(threshold=0.05),
        "FasterCache": FasterCacheConfig(
            current_timestep_callback=timestep, is_guidance_distilled=True, attention_weight_callback=lambda _: 0.5
        ),  # fmt: skip
    }


def gap_closed(outputs, queries, truths) -> float:
    """Mean over edits of 1 - |output - truth| / |query - truth| (pixels in [0, 1])."""
    closed = []
    for output, query, truth in zip(outputs, queries, truths):
        output, query, truth = (np.asarray(image, dtype=np.float32) / 255 for image in (output, query, truth))
        closed.append(1 - np.abs(output - truth).mean() / max(np.abs(query - truth).mean(), 1e-6))
    return float(np.mean(closed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per hook (interleaved).")
    args = parser.parse_args()

    pipe = toyworld.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    world = toyworld.model_world()
    tasks = []  # (exemplar pair, query, truth) per edit and seed
    for example in showcase.demo_examples(world):
        for seed in range(args.seeds):
            source, target = example.pair(1000 + seed)
            query, truth = example.pair(2000 + seed)
            tasks.append((pipe.encode_exemplar((source, target)), query, truth))
    queries, truths = [task[1] for task in tasks], [task[2] for task in tasks]

    def run_all():
        return [pipe(query, delta_embeds=tokens, num_inference_steps=args.steps,
                     generator=torch.Generator().manual_seed(0)).images[0] for tokens, query, _ in tasks]  # fmt: skip

    results, times = {}, {}
    for _ in range(args.rounds):
        for name, config in hooks(pipe, args.steps).items():
            if name in results and isinstance(results[name], str):
                continue  # a hook that failed fails again
            try:
                if config is not None:
                    pipe.transformer.enable_cache(config)
                start = time.perf_counter()
                outputs = run_all()
                times.setdefault(name, []).append(time.perf_counter() - start)
                results[name] = gap_closed(outputs, queries, truths)
            except Exception as error:  # noqa: BLE001  (a hook's failure is what this script reports)
                results[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:70]}"
            finally:
                if config is not None and pipe.transformer.is_cache_enabled:
                    pipe.transformer.disable_cache()

    print(f"{len(tasks)} edits ({len(tasks) // args.seeds} families x {args.seeds} scenes), {args.steps} steps, "
          f"toy world {world}")  # fmt: skip
    print(f"{'hook':<40} {'gap closed':>10} {'vs none':>8} {'time':>6}")
    for name, result in results.items():
        if isinstance(result, str):
            print(f"{name:<40} {result}")
            continue
        ratio = statistics.median(times[name]) / statistics.median(times["none"])
        print(f"{name:<40} {result:>10.3f} {result - results['none']:>+8.3f} {ratio:>5.2f}x")


if __name__ == "__main__":
    main()
