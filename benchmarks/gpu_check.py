#!/usr/bin/env python
"""The GPU check: real-size figures measured, each beside what `real_scale.py` predicts on the meta device.

For the day a GPU is lent: one command, no download (real-size configs with random weights, bfloat16), about 8 minutes
on one H100. For klein-4B and Kontext [dev] at each size: the edit's latency (4 and 28 steps), one adaptation step
and, at 512², a training step at batch 16 with gradient checkpointing, each with its counted FLOPs (so the achieved
TFLOP/s and the share of the GPU's dense bfloat16 peak) and, for the training step, its predicted memory beside the
measured peak (`torch.cuda.max_memory_allocated`). Prints a table and writes a JSON file.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--peak_tflops 989]

`--tiny` runs the same code on the test suite's tiny models on the CPU (the suite does, so the script cannot rot);
there the prediction is counted on the tiny models themselves and no peak memory is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import PIL.Image
import torch
from real_scale import (
    STEPS,
    build,
    count,
    flash_attention,
    objective_for,
    run_edit,
    training_memory,
    training_step,
)

from diffusers_delta.adaptation import AdaptationConfig
from diffusers_delta.atomic_folder import write_text_atomically
from diffusers_delta.testing import TINY, tiny_delta_pipeline


BACKBONES = ("klein-4B", "kontext-dev")
H100_DENSE_BF16_TFLOPS = 989.0
TRAINING = {"size": 512, "batch": 16}  # the paper's run, as the training script's default resolution


def synchronized(device: torch.device):
    """A clock that waits for the device's queued work before reading the time."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def median_seconds(work, now, rounds: int) -> float:
    """Median wall time of `work()` over `rounds` runs, after one warm-up run."""
    work()
    times = []
    for _ in range(rounds):
        start = now()
        work()
        times.append(now() - start)
    return statistics.median(times)


def pipeline(backbone: str, size: int, device: torch.device, tiny: bool):
    """The real-size pipeline with random weights on `device`, or the suite's tiny one (`tiny`) on the CPU."""
    if tiny:
        pipe = tiny_delta_pipeline(TINY, adapter_std=0.05, backbone="flux1" if backbone == "kontext-dev" else "flux2")
        if backbone != "kontext-dev":
            pipe.encode_empty_prompt(max_sequence_length=16, text_encoder_out_layers=(1, 2, 3))
        return pipe
    return build(backbone, size, device=device)


def check(backbone: str, size: int, device: torch.device, tiny: bool, rounds: int) -> list[dict]:
    """The measured rows of one backbone at one size, each with its prediction."""
    image = PIL.Image.new("RGB", (size, size))
    steps = STEPS[backbone] if not tiny else 2
    predicted = build(backbone, size) if not tiny else pipeline(backbone, size, device, tiny)  # counted here
    pipe = pipeline(backbone, size, device, tiny)
    now = synchronized(device)
    rows = []
    with torch.no_grad():
        flops, _ = count(lambda: run_edit(predicted, image, 1.0, steps))
        seconds = median_seconds(lambda: run_edit(pipe, image, 1.0, steps), now, rounds)
    rows.append({"backbone": backbone, "size": size, "what": f"edit ({steps} steps)", "seconds": seconds,
                 "tflop": flops / 1e12})  # fmt: skip
    resolution = AdaptationConfig().resolution  # adaptation scales a larger pair down to it
    pair = predicted._encode_pair_for_training(image, image, predicted._execution_device, resolution)
    flops, _ = count(training_step(objective_for(predicted, frozen=True, checkpointing="image"), pair, 1))
    measured_pair = pipe._encode_pair_for_training(image, image, device, resolution)
    step = training_step(objective_for(pipe, frozen=True, checkpointing="image"), measured_pair, 1)
    seconds = median_seconds(step, now, rounds)
    rows.append({"backbone": backbone, "size": size, "what": "adaptation step", "seconds": seconds,
                 "tflop": flops / 1e12})  # fmt: skip
    if size == (TINY.image_size if tiny else TRAINING["size"]):
        pair = predicted._encode_pair_for_training(image, image, predicted._execution_device)
        measured_pair = pipe._encode_pair_for_training(image, image, device)
        batch = TRAINING["batch"] if not tiny else 2
        memory = None if tiny else sum(training_memory(predicted, size, batch, "all").values())
        flops, _ = count(training_step(objective_for(predicted, frozen=True, checkpointing="all"), pair, batch))
        step = training_step(objective_for(pipe, frozen=True, checkpointing="all"), measured_pair, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(step, now, rounds)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        rows.append({"backbone": backbone, "size": size, "what": f"training step, batch {batch}, checkpointing",
                     "seconds": seconds, "tflop": flops / 1e12, "predicted_gb": memory, "peak_gb": peak})  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="Query sizes (pixels per side).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed runs per figure, after one warm-up.")
    parser.add_argument("--peak_tflops", type=float, default=H100_DENSE_BF16_TFLOPS, help="The GPU's dense bf16 peak.")
    parser.add_argument("--out", default="gpu_check.json", help="Where to write the rows as JSON.")
    parser.add_argument(
        "--tiny", action="store_true", help="The suite's tiny models on the CPU (a check of the script)."
    )
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("No CUDA device here: run this on a GPU, or pass --tiny to check the script on the CPU.")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}.")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    sizes = [TINY.image_size] if args.tiny else args.sizes
    rows = []
    with flash_attention() if not args.tiny else contextlib.nullcontext():  # CUDA's kernel for bf16, as counted
        for backbone in args.backbones:
            for size in sizes:
                rows.extend(check(backbone, size, device, args.tiny, args.rounds))
    for row in rows:
        row["tflops_achieved"] = row["tflop"] / row["seconds"]
        row["utilisation"] = row["tflops_achieved"] / args.peak_tflops
    header = (
        f"{'backbone':<12} {'size':>5} {'what':<38} {'seconds':>8} {'TFLOP':>9} {'TFLOP/s':>8} {'of peak':>8} memory"
    )
    print(header)
    for row in rows:
        memory = ""
        if "predicted_gb" in row:
            predicted, peak = row["predicted_gb"], row["peak_gb"]
            memory = f"predicted {predicted:.1f} GB, peak {peak:.1f} GB" if peak is not None else "(not measured)"
        print(f"{row['backbone']:<12} {row['size']:>5} {row['what']:<38} {row['seconds']:>8.3f} {row['tflop']:>9.2f} "
              f"{row['tflops_achieved']:>8.1f} {100 * row['utilisation']:>7.1f}% {memory}")  # fmt: skip
    write_text_atomically(json.dumps(rows, indent=1), Path(args.out))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
