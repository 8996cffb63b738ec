#!/usr/bin/env python
"""Pre-train toy world 2's SigLIP stand-in without edit labels: masked patch reconstruction on world images.

A random frozen SigLIP cannot tell many of toy world 2's families apart from its deltas
(`examples/toyworld/encoder_probe.py`: geometry and colour families near chance), as a real one pre-trained on the
web could. This pre-trains it self-supervised, as such encoders are, on the world's pictures before and after every
kind of edit (`world_batch`, its instructions unused): a third of the patches are blanked in the input, and every
patch token must give back its own patch's pixels, so tokens carry what their patch shows and what surrounds it.
Writes a SigLIP folder (`SiglipVisionModel` and its preprocessing) the training script and the probe read.

    python examples/toyworld/pretrain_image_encoder.py --output_dir toy2/siglip --minutes 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from diffusers_delta.semantic_delta import SiglipPreprocessor
from diffusers_delta.toyworld import IMAGE_SIZE, world_batch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_default_model import image_encoder_config  # noqa: E402


PATCH = image_encoder_config().patch_size


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Where to write the SigLIP folder.")
    parser.add_argument("--minutes", type=float, default=10.0, help="Wall-clock budget.")
    parser.add_argument("--max_steps", type=int, default=None, help="Stop after this many steps (for tests).")
    parser.add_argument("--batch_size", type=int, default=64, help="Pictures per step.")
    parser.add_argument("--mask_fraction", type=float, default=0.33, help="Share of patches blanked in the input.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the weights and the data.")
    return parser.parse_args(argv)


def patches(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, 3 * PATCH * PATCH), patches in SigLIP's row-major order."""
    return images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def main(args: argparse.Namespace) -> SiglipVisionModel:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    encoder = SiglipVisionModel(image_encoder_config()).train()
    head = torch.nn.Linear(encoder.config.hidden_size, 3 * PATCH * PATCH)  # a patch token -> its patch's pixels
    preprocessor = SiglipPreprocessor(IMAGE_SIZE)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    progress = tqdm(desc="image encoder", unit="step", mininterval=2)
    step = 0
    while time.monotonic() < deadline and (args.max_steps is None or step < args.max_steps):
        references, targets, _ = world_batch(rng, args.batch_size // 2)  # edit labels unused
        images = (torch.cat([references, targets]) + 1) / 2  # (B, 3, H, W) in [0, 1]
        grid = IMAGE_SIZE // PATCH
        keep = torch.rand(images.shape[0], 1, grid, grid, generator=generator) >= args.mask_fraction
        keep = keep.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
        masked = torch.where(keep, images, torch.full_like(images, 0.5))
        tokens = encoder(pixel_values=preprocessor(masked)).last_hidden_state  # (B, P, D)
        loss = F.mse_loss(head(tokens), patches(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    print(f"image encoder: {step} steps, reconstruction loss {loss.item():.4f}")
    encoder.eval().requires_grad_(False)
    output_dir = Path(args.output_dir)
    encoder.save_pretrained(output_dir)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(output_dir)
    return encoder


if __name__ == "__main__":
    main(parse_args())
