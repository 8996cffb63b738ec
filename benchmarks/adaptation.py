#!/usr/bin/env python
"""Cost of test-time adaptation: `adapt_to_exemplar(num_steps=20)` against one 4-step edit, side by side.

On the `SMALL` CPU configuration of `diffusers_delta.testing` (256x256 images, random weights, a trained-like random
adapter). Time: interleaved runs in one process, as a multiple of one edit (goal: at most 15 edits' worth). Memory:
each in a fresh process, the peak resident memory the work adds on top of the loaded pipeline, as a ratio.

    python benchmarks/adaptation.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def build():
    from diffusers_delta import FluxDeltaEditPipeline
    from diffusers_delta.testing import (
        SMALL,
        TEXT_KWARGS,
        random_image,
        randomize_,
        tiny_adapter,
        tiny_image_encoder,
        tiny_klein_components,
    )

    pipe = FluxDeltaEditPipeline(**tiny_klein_components(SMALL))
    pipe.register_modules(image_encoder=tiny_image_encoder(SMALL))
    adapter = randomize_(tiny_adapter(pipe.transformer, SMALL), std=0.05)
    pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    pipe.set_progress_bar_config(disable=True)
    size = (SMALL.image_size, SMALL.image_size)
    source, target, query = random_image(1, size), random_image(2, size), random_image(0, size)

    def edit():
        pipe(query, exemplar=(source, target), generator=torch.Generator().manual_seed(0), output_type="np",
             **TEXT_KWARGS)  # fmt: skip

    def adapt():
        pipe.adapt_to_exemplar(source, target, num_steps=20, generator=torch.Generator().manual_seed(0), **TEXT_KWARGS)

    return edit, adapt


def peak_memory(work: str, queue) -> None:
    edit, adapt = build()
    baseline = _rss_mb()
    {"edit": edit, "adapt": adapt}[work]()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    edit, adapt = build()
    edit()  # warm-up
    edit_times, adapt_times = [], []
    for _ in range(args.rounds):
        for _ in range(3):
            start = time.perf_counter()
            edit()
            edit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        adapt()
        adapt_times.append(time.perf_counter() - start)

    context = multiprocessing.get_context("spawn")
    memory = {}
    for work in ("edit", "adapt"):
        queue = context.Queue()
        process = context.Process(target=peak_memory, args=(work, queue))
        process.start()
        memory[work] = queue.get()
        process.join()

    edit_s, adapt_s = statistics.median(edit_times), statistics.median(adapt_times)
    print(f"SMALL config, 256x256, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"one 4-step edit:                 {edit_s:7.3f} s    peak +{memory['edit']:6.0f} MiB")
    print(f"adapt_to_exemplar(num_steps=20): {adapt_s:7.3f} s    peak +{memory['adapt']:6.0f} MiB")
    print(f"adaptation = {adapt_s / edit_s:.1f} edits' worth of time (goal <= 15), "
          f"{memory['adapt'] / memory['edit']:.2f}x the peak memory of an edit")  # fmt: skip


if __name__ == "__main__":
    main()
