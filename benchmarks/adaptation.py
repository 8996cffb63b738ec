#!/usr/bin/env python
"""Cost of test-time adaptation: `adapt_to_exemplar(num_steps=20)` against one 4-step edit, side by side.

On the `SMALL` CPU configuration of `diffusers_delta.testing` (256x256 images, random weights, a trained-like random
adapter). Time: interleaved runs, as a multiple of one edit (goal: at most 12 edits' worth). Memory: the peak resident
memory each adds on top of the loaded pipeline, each in a fresh process (the kernel's high-water mark, reset after
loading), as a ratio.

    python benchmarks/adaptation.py [--rounds 2]
    python benchmarks/adaptation.py --sweep 1e-4 1e-3 1e-2    # how AdaptationConfig's learning rate was chosen

The sweep adapts with each learning rate and reports the objective on held-out noise draws of the same pair (8 noise
levels from 0.1 to 0.9, fixed noise) before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from peak_memory import peak_since_reset, reset_peak


def build():
    from diffusers_delta.testing import SMALL, TEXT_KWARGS, random_image, tiny_delta_pipeline

    pipe = tiny_delta_pipeline(SMALL, adapter_std=0.05)
    size = (SMALL.image_size, SMALL.image_size)
    source, target, query = random_image(1, size), random_image(2, size), random_image(0, size)

    def edit():
        pipe(query, exemplar=(source, target), generator=torch.Generator().manual_seed(0), output_type="np",
             **TEXT_KWARGS)  # fmt: skip

    def adapt(lambda_delta: float = 1.0):
        generator = torch.Generator().manual_seed(0)
        pipe.adapt_to_exemplar(
            source, target, num_steps=20, lambda_delta=lambda_delta, generator=generator, **TEXT_KWARGS
        )

    return pipe, edit, adapt


def sweep(pipe, learning_rates: list[float]) -> None:
    from diffusers_delta.semantic_delta import SiglipPreprocessor
    from diffusers_delta.testing import SMALL, TEXT_KWARGS, random_image
    from diffusers_delta.training import DeltaAdapterObjective

    size = (SMALL.image_size, SMALL.image_size)
    source, target = random_image(1, size), random_image(2, size)
    pair = pipe._encode_pair_for_training(source, target, "cpu")
    prompt_embeds = pipe._text_conditioning("", **TEXT_KWARGS)["prompt_embeds"].detach()
    objective = DeltaAdapterObjective(
        pipe.delta_adapter, pipe.transformer, pipe.vae, pipe.image_encoder,
        SiglipPreprocessor(SMALL.siglip_image_size), prompt_embeds,
    )  # fmt: skip
    batch = {key: value.expand(8, *value.shape[1:]) for key, value in pair.items()}
    noise = torch.randn((8, *pair["target_latents"].shape[1:]), generator=torch.Generator().manual_seed(123))

    def held_out() -> str:
        with torch.no_grad():
            terms = objective(**batch, noise=noise, sigmas=torch.linspace(0.1, 0.9, 8))
        return (
            f"flow matching {terms['flow_matching'].item():.4f}, consistency {terms['delta_consistency'].item():.4f}"
        )

    pipe._attach_delta_processors(pipe.delta_adapter)
    print(f"held-out objective before adaptation: {held_out()}")
    for learning_rate in learning_rates:
        pipe.adapt_to_exemplar(
            source, target, learning_rate=learning_rate, generator=torch.Generator().manual_seed(0), **TEXT_KWARGS
        )
        print(f"after 20 steps at learning rate {learning_rate:g}: {held_out()}")


def added_peak(work: str, queue) -> None:
    """In a fresh process (so no freed-but-kept heap hides the cost): MiB the work adds, at its peak, to what the
    loaded pipeline holds."""
    _, edit, adapt = build()
    before = reset_peak()
    {"edit": edit, "adapt": adapt}[work]()
    queue.put(peak_since_reset() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sweep", type=float, nargs="+", metavar="LR", help="Sweep these learning rates instead.")
    args = parser.parse_args()

    pipe, edit, adapt = build()
    if args.sweep:
        return sweep(pipe, args.sweep)
    edit()  # warm-up
    edit_times, adapt_times, flow_only_times = [], [], []
    for _ in range(args.rounds):
        for _ in range(3):
            start = time.perf_counter()
            edit()
            edit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        adapt()
        adapt_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        adapt(lambda_delta=0.0)  # without the consistency loss: no decode, no SigLIP, no backward through them
        flow_only_times.append(time.perf_counter() - start)

    context = multiprocessing.get_context("spawn")
    memory = {}
    for work in ("edit", "adapt"):
        queue = context.Queue()
        process = context.Process(target=added_peak, args=(work, queue))
        process.start()
        memory[work] = queue.get()
        process.join()

    edit_s, adapt_s, flow_s = (statistics.median(t) for t in (edit_times, adapt_times, flow_only_times))
    print(f"SMALL config, 256x256, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"one 4-step edit:                 {edit_s:7.3f} s    peak +{memory['edit']:6.0f} MiB")
    print(f"adapt_to_exemplar(num_steps=20): {adapt_s:7.3f} s    peak +{memory['adapt']:6.0f} MiB")
    print(f"  the same, lambda_delta=0:      {flow_s:7.3f} s    ({flow_s / edit_s:.1f} edits' worth)")
    print(f"adaptation = {adapt_s / edit_s:.1f} edits' worth of time (goal <= 12), "
          f"{memory['adapt'] / memory['edit']:.2f}x the peak memory of an edit")  # fmt: skip


if __name__ == "__main__":
    main()
