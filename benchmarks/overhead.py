#!/usr/bin/env python
"""Wall-time overhead of Delta-Adapter over plain FLUX.2 [klein] editing, measured side by side.

Two pipelines with identical weights (the `SMALL` CPU configuration of `diffusers_delta.testing`, random weights,
a trained-like random adapter) edit the same 256x256 query with the same seed, 4 steps, in interleaved runs:

- `Flux2KleinPipeline`                                   (the base)
- `FluxDeltaEditPipeline` with `delta_embeds=`           (the adapter's cost inside the denoising loop)
- `FluxDeltaEditPipeline` with `exemplar=(src, tgt)`     (plus encoding the exemplar with SigLIP and the adapter)

and `encode_exemplar` alone. Medians are printed with their ratios. Goal: adapter overhead <= 5% of a 4-step edit.

    python benchmarks/overhead.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import Flux2KleinPipeline

from diffusers_delta.testing import SMALL, TEXT_KWARGS, random_image, tiny_delta_pipeline, tiny_klein_components


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    base = Flux2KleinPipeline(**tiny_klein_components(SMALL))
    pipe = tiny_delta_pipeline(SMALL, adapter_std=0.05)  # same seeds: the same base weights as `base`
    base.set_progress_bar_config(disable=True)

    size = (SMALL.image_size, SMALL.image_size)
    query, exemplar = random_image(0, size), (random_image(1, size), random_image(2, size))
    prompt_embeds, _ = base.encode_prompt("", **TEXT_KWARGS)
    delta_embeds = pipe.encode_exemplar(exemplar)
    common = {"num_inference_steps": 4, "output_type": "np", "prompt_embeds": prompt_embeds}

    def run_base():
        base(image=query, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **common)

    def run_embeds():
        pipe(query, delta_embeds=delta_embeds, generator=torch.Generator().manual_seed(0), **common)

    def run_exemplar():
        pipe(query, exemplar=exemplar, generator=torch.Generator().manual_seed(0), **common)

    def run_encode():
        pipe.encode_exemplar(exemplar)

    runs = {"base": run_base, "delta_embeds": run_embeds, "exemplar": run_exemplar, "encode": run_encode}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(timed(run))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(
        f"SMALL config, {size[0]}x{size[1]} query, 4 steps, {args.rounds} interleaved rounds, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'run':<40} {'median s':>9} {'vs base':>8}")
    print(f"{'Flux2KleinPipeline':<40} {median['base']:>9.3f} {1.0:>8.3f}")
    print(
        f"{'FluxDeltaEditPipeline, delta_embeds':<40} {median['delta_embeds']:>9.3f} "
        f"{median['delta_embeds'] / median['base']:>8.3f}"
    )
    print(
        f"{'FluxDeltaEditPipeline, exemplar':<40} {median['exemplar']:>9.3f} "
        f"{median['exemplar'] / median['base']:>8.3f}"
    )
    print(f"{'encode_exemplar alone':<40} {median['encode']:>9.3f} {median['encode'] / median['base']:>8.3f}")
    overhead = median["delta_embeds"] / median["base"] - 1
    print(f"adapter overhead in the denoising loop: {overhead:+.1%} of a 4-step edit (goal <= +5%)")
    print(f"exemplar encoding: {median['encode'] / median['exemplar']:.1%} of one edit with exemplar")


if __name__ == "__main__":
    main()
