#!/usr/bin/env python
"""What a Delta-Adapter training run costs, before anyone rents a GPU: FLOPs, memory per GPU and GPU-hours.

A training step is counted, not guessed: the real-size backbone, SigLIP-so400m and the adapter are built on the `meta`
device in bfloat16 (as `real_scale.py` builds them) and one step runs through the library's own code: each pair's
encoding (`_encode_pair_for_training`: the VAE encoder and SigLIP on source and target) and one forward and backward
of `DeltaAdapterObjective` at the per-GPU batch, with the training script's gradient checkpointing when asked
(its recomputation counted). Memory per GPU is `real_scale.training_memory` (frozen bf16 weights, the adapter's
float32 weights and Adam states, a training step's peak beyond them: activations, recomputation and gradients; add 2-4
GB of CUDA context and slack).
GPU-hours assume a stated utilisation of each GPU's dense bf16 peak (40% by default: a measured run will differ).

The defaults are the paper's run (Delta-Adapter, section 5.1): klein-4B, 4 GPUs, batch 16 per GPU, 100K steps,
λ_delta = 1, at the training script's default 512² with `--gradient_checkpointing` (the paper does not state its
resolution; batch 16 per GPU fits 80 GB only with checkpointing). Any flag changes it:

    python benchmarks/training_cost.py
    python benchmarks/training_cost.py --backbone klein-9B --num_gpus 8 --train_batch_size 4 --resolution 1024
"""

from __future__ import annotations

import argparse

import PIL.Image
import torch
from real_scale import BACKBONE_CHOICES, build, count, flash_attention, objective_for, training_memory, training_step

from diffusers_delta.data import check_resolution


#: Dense bf16 peak of each GPU, TFLOP/s (NVIDIA's data sheets, SXM parts, without sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GPU_MEMORY_GB = {"H100": 80, "H200": 141, "A100": 80}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="klein-4B", choices=BACKBONE_CHOICES, help="The base model.")
    parser.add_argument("--resolution", type=int, default=512, help="Training resolution (square), as the script's.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Pairs per GPU per micro-step.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per step.")
    parser.add_argument("--num_gpus", type=int, default=4, help="GPUs (data parallel).")
    parser.add_argument("--max_train_steps", type=int, default=100_000, help="Optimizer steps.")
    parser.add_argument("--lambda_delta", type=float, default=1.0, help="0 drops the consistency loss's decode.")
    parser.add_argument(
        "--no_gradient_checkpointing",
        action="store_true",
        help="Count the run without the script's --gradient_checkpointing (faster, far more memory).",
    )
    parser.add_argument("--utilization", type=float, default=0.4, help="Share of the GPU's peak actually reached.")
    args = parser.parse_args(argv)
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_gpus", "max_train_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    try:  # the training script's own rule, before anything is counted
        check_resolution(args.resolution)
    except ValueError as error:
        parser.error(str(error))
    if not 0 < args.utilization <= 1:
        parser.error("--utilization is a share of the peak: between 0 and 1.")
    return args


def step_flops(backbone: str, size: int, batch_size: int, checkpointing: str, lambda_delta: float) -> float:
    """FLOPs of one micro-step on one GPU: `batch_size` pairs encoded, then the objective's forward and backward."""
    pipe = build(backbone, size)
    image = PIL.Image.new("RGB", (size, size))
    encoding, _ = count(lambda: pipe._encode_pair_for_training(image, image, torch.device("meta")))
    pair = pipe._encode_pair_for_training(image, image, torch.device("meta"))
    objective = objective_for(pipe, frozen=True, checkpointing=checkpointing, lambda_delta=lambda_delta)
    objective_flops, _ = count(training_step(objective, pair, batch_size))
    return batch_size * encoding + objective_flops


def main() -> None:
    args = parse_args()
    checkpointing = "none" if args.no_gradient_checkpointing else "all"
    with flash_attention():
        micro_step = step_flops(
            args.backbone, args.resolution, args.train_batch_size, checkpointing, args.lambda_delta
        )
        pipe = build(args.backbone, args.resolution)
        memory = training_memory(pipe, args.resolution, args.train_batch_size, checkpointing)
    per_step = micro_step * args.gradient_accumulation_steps * args.num_gpus  # every GPU, every micro-step
    total = per_step * args.max_train_steps
    pairs = args.train_batch_size * args.gradient_accumulation_steps * args.num_gpus

    print(
        f"{args.backbone} at {args.resolution}², {args.num_gpus} GPU(s) x batch {args.train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation = {pairs} pairs a step, {args.max_train_steps:,} steps "
        f"({pairs * args.max_train_steps:,} pairs), λ_delta {args.lambda_delta}, gradient checkpointing "
        f"{'off' if args.no_gradient_checkpointing else 'on'}"
    )
    print(f"FLOPs: {micro_step / 1e12:.1f} TFLOP per GPU micro-step, {per_step / 1e15:.2f} PFLOP per step, "
          f"{total / 1e15:,.0f} PFLOP in all")  # fmt: skip
    gigabytes = sum(memory.values())
    parts = f"frozen weights {memory['weights']:.1f}, adapter + Adam {memory['adapter state']:.1f}"
    print(f"Memory per GPU: {gigabytes:.1f} GB ({parts}, step peak {memory['activations']:.1f}; add 2-4 GB of CUDA "
          "context)")  # fmt: skip
    print()
    header = ["GPU", "peak TFLOP/s", "utilisation", "fits", "seconds / step", "wall-clock hours", "GPU-hours"]
    rows = []
    for gpu, peak in GPU_PEAK_TFLOPS.items():
        seconds_per_step = micro_step * args.gradient_accumulation_steps / (peak * 1e12 * args.utilization)
        hours = seconds_per_step * args.max_train_steps / 3600
        fits = "yes" if gigabytes + 3 <= GPU_MEMORY_GB[gpu] else "no"
        rows.append([gpu, f"{peak:.0f}", f"{args.utilization:.0%}", f"{fits} ({GPU_MEMORY_GB[gpu]} GB)",
                     f"{seconds_per_step:.2f}", f"{hours:,.1f}", f"{hours * args.num_gpus:,.1f}"])  # fmt: skip
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
