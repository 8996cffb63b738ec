#!/usr/bin/env python
"""Cost of one Delta-Adapter training step: with and without the consistency loss and gradient checkpointing.

Each configuration runs in a fresh process (so its peak memory is its own) on the `SMALL` CPU configuration of
`diffusers_delta.testing` (256x256 pairs, batch 2), over interleaved rounds; the table gives median seconds per step
and the peak resident memory the steps add on top of the loaded models, as ratios to plain flow matching.

    python benchmarks/train_step.py [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from peak_memory import peak_since_reset, reset_peak


CONFIGS = {  # name: (lambda_delta, gradient_checkpointing)
    "flow matching": (0.0, False),
    "flow matching + consistency": (1.0, False),
    "flow matching, checkpointed": (0.0, True),
    "flow matching + consistency, checkpointed": (1.0, True),
}


def measure(lambda_delta: float, checkpointing: bool, steps: int, queue) -> None:
    from diffusers_delta.backbones.flux2 import encode_latents
    from diffusers_delta.image_inputs import pil_to_tensor
    from diffusers_delta.semantic_delta import SiglipPreprocessor, patch_features
    from diffusers_delta.testing import SMALL, random_image, tiny_adapter, tiny_image_encoder, tiny_klein_components
    from diffusers_delta.training import DeltaAdapterObjective

    components = tiny_klein_components(SMALL)
    transformer, vae, encoder = components["transformer"], components["vae"], tiny_image_encoder(SMALL)
    for model in (transformer, vae, encoder):
        model.requires_grad_(False)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    adapter = tiny_adapter(transformer, SMALL).train()
    preprocessor = SiglipPreprocessor(SMALL.siglip_image_size)
    objective = DeltaAdapterObjective(
        adapter, transformer, vae, encoder, preprocessor, torch.randn(1, 16, 3 * SMALL.qwen_hidden), lambda_delta
    )
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    size = (SMALL.image_size, SMALL.image_size)
    pixels = torch.stack([pil_to_tensor(random_image(i, size)) for i in range(4)]) * 2 - 1  # (4, 3, 256, 256)
    latents = encode_latents(vae, pixels)
    with torch.no_grad():
        features = patch_features(encoder, preprocessor(pixels / 2 + 0.5))
    batch = {
        "source_latents": latents[:2], "target_latents": latents[2:], "source_features": features[:2],
        "target_features": features[2:], "noise": torch.randn_like(latents[2:]), "sigmas": torch.tensor([0.3, 0.8]),
    }  # fmt: skip

    def step():
        objective(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    baseline = reset_peak()
    step()  # warm-up (allocates the optimizer state too)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    queue.put((statistics.median(times), peak_since_reset() - baseline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = {name: ([], []) for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (lambda_delta, checkpointing) in CONFIGS.items():
            queue = context.Queue()
            process = context.Process(target=measure, args=(lambda_delta, checkpointing, args.steps, queue))
            process.start()
            seconds, memory = queue.get()
            process.join()
            results[name][0].append(seconds)
            results[name][1].append(memory)

    reference_time = statistics.median(results["flow matching"][0])
    reference_memory = statistics.median(results["flow matching"][1])
    print(f"SMALL config, batch 2 at 256x256, {args.rounds} rounds x {args.steps} steps, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'configuration':<44} {'s/step':>7} {'x time':>7} {'step MiB':>9} {'x memory':>9}")
    for name, (times, memories) in results.items():
        seconds, memory = statistics.median(times), statistics.median(memories)
        print(f"{name:<44} {seconds:>7.3f} {seconds / reference_time:>7.2f} {memory:>9.0f} "
              f"{memory / reference_memory:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
