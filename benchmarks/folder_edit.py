#!/usr/bin/env python
"""Folder-scale editing throughput: images per second of `diffusers-delta edit --queries` for batch sizes 1, 4 and
16, and the speed-up of splitting the folder between 2 processes under `accelerate launch`, as ratios of one run.

The model is the `SMALL` CPU configuration of `diffusers_delta.testing` (random weights, 256x256 images, 4 steps),
saved as a model folder; the queries are random 256x256 images. Every measurement is the command's own timing of
its editing (model loading excluded), and every configuration runs `--rounds` times, interleaved, so the machine's
drift hits them all alike; medians are printed. Threads are torch's default (one process) or accelerate's one per
process, and for batch 4 also every core and one thread, set by OMP_NUM_THREADS. `--toy` runs the embedded toy model
on 64x64 queries instead.

    python benchmarks/folder_edit.py [--images 16] [--rounds 2] [--toy]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from diffusers_delta import toyworld
from diffusers_delta.testing import SMALL, free_port, random_image, save_tiny_toy_model


def images_per_second(work: Path, batch_size: int, processes: int, threads: int | None = None) -> float:
    """One run of the command on a fresh output folder: the images per second it reports."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="out-"))
    command = [
        "edit", "--exemplar", str(work / "source.png"), str(work / "target.png"), "--queries", str(work / "queries"),
        "--out", str(out), "--base", str(work / "model" / "base"), "--adapter", str(work / "model" / "adapter"),
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    environment["HF_HUB_OFFLINE"] = "1"
    if threads is not None:  # else torch's default, or accelerate's one thread per process
        environment["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        launcher = [sys.executable, "-m", "diffusers_delta.cli"]
    else:
        environment.update(ACCELERATE_USE_CPU="true")
        launcher = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "diffusers_delta.cli",
        ]  # fmt: skip
    result = subprocess.run([*launcher, *command], env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return float(re.search(r"\(([\d.]+) images/s\)", result.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="Queries in the folder.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--toy", action="store_true", help="The embedded toy model and 64x64 queries instead.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.toy:
            shutil.copytree(toyworld.DEFAULT_MODEL_DIR, work / "model")
            size = (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
        else:
            save_tiny_toy_model(work / "model", SMALL)
            size = (SMALL.image_size, SMALL.image_size)
        random_image(1, size).save(work / "source.png")
        random_image(2, size).save(work / "target.png")
        (work / "queries").mkdir()
        for index in range(args.images):
            random_image(100 + index, size).save(work / "queries" / f"{index:04d}.png")

        cores = os.cpu_count() or 1
        configurations = {  # (batch, processes, threads per process: None for the command's own choice)
            "batch 1": (1, 1, None), "batch 4": (4, 1, None), "batch 16": (16, 1, None),
            "batch 4, 2 processes": (4, 2, None), f"batch 4, {cores} threads": (4, 1, cores),
            "batch 4, 1 thread": (4, 1, 1),
        }  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in configurations}
        for _ in range(args.rounds):
            for name, (batch_size, processes, threads) in configurations.items():
                rates[name].append(images_per_second(work, batch_size, processes, threads))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    model = "the toy model" if args.toy else "SMALL model"
    print(f"{args.images} queries of {size[0]}x{size[1]}, {model}, 4 steps, {os.cpu_count()} cores; medians of "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'configuration':<22} {'images/s':>9} {'vs batch 1':>11}")
    for name, rate in medians.items():
        print(f"{name:<22} {rate:>9.2f} {rate / medians['batch 1']:>10.2f}x")
    print(f"2 processes vs 1 (batch 4): {medians['batch 4, 2 processes'] / medians['batch 4']:.2f}x")


if __name__ == "__main__":
    main()
