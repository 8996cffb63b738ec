#!/usr/bin/env python
"""Train the toy world's stand-in for FLUX.2's VAE: a small `AutoencoderKLFlux2` on freshly generated scenes.

64x64 scenes -> 16x16x8 latents (8 latent channels; 8x8 = 64 transformer tokens after FLUX.2's 2x2 patchify). The
VAE's batch-norm running statistics, which FLUX.2 uses to normalise latents and which `forward` never updates, are
filled from encoded scenes at the end. Prints held-out PSNR.

    python examples/toyworld/train_vae.py --output_dir toy/vae --minutes 8

With `--checkpoint_dir`, the training state is written there every `--checkpointing_steps` steps (and when the time
budget ends), and a run started with the same flags resumes from it exactly, as the base editor's does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffusers_delta.toyworld import (
    IMAGE_SIZE,
    SPLITS,
    changed_pair,
    edit_space,
    render,
    scene_batch,
    space_batch,
    split_edits,
    world_batch,
)
from diffusers_delta.toyworld.families import edits_by_family


sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_base_editor import load_checkpoint, save_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--minutes", type=float, default=8.0, help="Wall-clock budget for training.")
    parser.add_argument("--max_steps", type=int, default=None, help="Stop after this many steps (for tests).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--l1_weight", type=float, default=0.0,
                        help="Weight of an L1 term beside the MSE (sharper flat colours and edges).")  # fmt: skip
    parser.add_argument("--block_out_channels", type=int, nargs=3, default=[16, 32, 64],
                        help="Widths of the 3 levels (the shipped world: 16 32 64).")  # fmt: skip
    parser.add_argument("--lr_scheduler", default="constant", choices=["constant", "cosine"],
                        help="cosine: warm up 50 steps, then decay to zero at --max_steps.")  # fmt: skip
    parser.add_argument("--stats_batches", type=int, default=16, help="Batches encoded for the batch-norm stats.")
    parser.add_argument("--edited_fraction", type=float, default=0.0,
                        help="Share of training scenes shown after a random edit.")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint_dir", default=None,
                        help="Where the training state is kept, and resumed from when it is there.")  # fmt: skip
    parser.add_argument("--checkpointing_steps", type=int, default=200,
                        help="Steps between two checkpoints (with --checkpoint_dir).")  # fmt: skip
    parser.add_argument(
        "--world",
        default="edits",
        choices=["edits", "families", "space"],
        help="edits: scenes and the shipped world's eight edits; families: toy world 2, scenes and every edit of "
        "every split (references and targets of world_batch), with the floor reported per split and family; space: "
        "toy world 3 (space_batch), with the floor reported on sampled and held-out edits.",
    )
    parser.add_argument("--init_from", default=None,
                        help="A VAE folder to start from (fine-tuning it) instead of a new VAE of "
                        "--block_out_channels.")  # fmt: skip
    args = parser.parse_args(argv)
    if args.checkpointing_steps < 1:
        parser.error("--checkpointing_steps must be at least 1.")
    return args


def resume_flags(args: argparse.Namespace) -> dict:
    """The flags a checkpoint is tied to: any other value would train another VAE from its state."""
    names = ("world", "batch_size", "learning_rate", "kl_weight", "l1_weight", "block_out_channels", "lr_scheduler",
             "edited_fraction", "seed", "init_from")  # fmt: skip
    flags = {name: getattr(args, name) for name in names}
    if args.lr_scheduler == "cosine":
        flags["max_steps"] = args.max_steps
    return flags


def build_vae(block_out_channels: tuple[int, int, int] = (16, 32, 64)) -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


@torch.no_grad()
def fill_latent_statistics(vae: AutoencoderKLFlux2, rng: np.random.Generator, batches: int, batch_size: int) -> None:
    """Sets `vae.bn`'s running mean and variance to those of patchified latents of generated scenes."""
    latents = torch.cat(
        [Flux2KleinPipeline._patchify_latents(vae.encode(scene_batch(rng, batch_size)).latent_dist.mode())
         for _ in range(batches)]
    )  # fmt: skip  # (N, 4C, h, w)
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


@torch.no_grad()
def psnr(vae: AutoencoderKLFlux2, images: torch.Tensor) -> float:
    reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((reconstruction + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1.0 / mse)


@torch.no_grad()
def report_floor_per_family(vae: AutoencoderKLFlux2, seed: int, count: int = 8) -> None:
    """Toy world 2: the VAE's reconstruction error (mean absolute, 0-1) of edited pictures, per split and family:
    the floor below which no edit's error can go."""
    for split in SPLITS:
        for name, edits in edits_by_family(split_edits(split)).items():
            pictures = [render(changed_pair(edits[i % len(edits)], seed + i, IMAGE_SIZE)[1]) for i in range(count)]
            images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
            print(f"floor {split} {name:<24} {((reconstruction - images).abs().mean() / 2).item():.4f}")


@torch.no_grad()
def report_floor_space(vae: AutoencoderKLFlux2, count: int = 8) -> None:
    """Toy world 3: the VAE's reconstruction error (mean absolute, 0-1) of pictures edited by sampled edits and by
    each held-out edit, on evaluation scenes."""

    def floor(pictures) -> float:
        images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        return ((reconstruction - images).abs().mean() / 2).item()

    rng = np.random.default_rng([edit_space.EVALUATION_SEED, 1])
    sampled = [edit_space.sample_pair(rng) for _ in range(4 * count)]
    print(f"floor sampled edits              {floor([render(spec.edit()(scene)) for spec, scene in sampled]):.4f}")
    for name, spec in edit_space.HELD_OUT_EDITS.items():
        print(f"floor {name:<26} {floor([render(edit_space.evaluation_pair(spec, i)[1]) for i in range(count)]):.4f}")


def main(args: argparse.Namespace) -> AutoencoderKLFlux2:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    held_out = scene_batch(np.random.default_rng(args.seed + 10_000), 64)
    if args.init_from:
        vae = AutoencoderKLFlux2.from_pretrained(args.init_from).train()
    else:
        vae = build_vae(args.block_out_channels).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    if args.lr_scheduler == "cosine" and args.max_steps is None:
        raise SystemExit("error: --lr_scheduler cosine decays to zero at --max_steps; give it.")
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=50, num_training_steps=args.max_steps)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    flags = resume_flags(args)
    step = load_checkpoint(checkpoint_dir, vae, optimizer, lr_scheduler, rng, flags) if checkpoint_dir else 0
    saved_step = step
    deadline = time.monotonic() + args.minutes * 60
    progress = tqdm(desc="VAE", unit="step", mininterval=2, initial=step, total=args.max_steps)
    while time.monotonic() < deadline and (args.max_steps is None or step < args.max_steps):
        if args.world == "families":
            references, targets, _ = world_batch(rng, args.batch_size // 2, edited_fraction=args.edited_fraction)
            images = torch.cat([references, targets])  # (B, 3, H, W): pictures before and after edits
        elif args.world == "space":
            references, targets, _ = space_batch(rng, args.batch_size // 2, edited_fraction=args.edited_fraction)
            images = torch.cat([references, targets])
        else:
            images = scene_batch(rng, args.batch_size, edited_fraction=args.edited_fraction)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, images) + args.kl_weight * posterior.kl().mean()
        if args.l1_weight:
            loss = loss + args.l1_weight * F.l1_loss(reconstruction, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        step += 1
        progress.update()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_dir and step % args.checkpointing_steps == 0:
            save_checkpoint(checkpoint_dir, vae, optimizer, lr_scheduler, rng.bit_generator.state, step, flags)
            saved_step = step
    progress.close()
    if checkpoint_dir and step != saved_step:  # the time budget ended between two checkpoints
        save_checkpoint(checkpoint_dir, vae, optimizer, lr_scheduler, rng.bit_generator.state, step, flags)
    vae.eval()
    fill_latent_statistics(vae, rng, args.stats_batches, args.batch_size)
    print(f"VAE: {step} steps, held-out PSNR {psnr(vae, held_out):.1f} dB")
    if args.world == "families":
        report_floor_per_family(vae, seed=args.seed + 20_000)
    elif args.world == "space":
        report_floor_space(vae)
    vae.save_pretrained(args.output_dir)
    return vae


if __name__ == "__main__":
    main(parse_args())
