#!/usr/bin/env python
"""Can an image encoder's semantic deltas tell toy world 2's edit families apart? A linear probe says.

The adapter can only transfer what the encoder's delta `LN(f_tgt) - LN(f_src)` shows. This trains a linear classifier
of the family on the flattened deltas of S1 pairs (seen families, seen values) and reports its accuracy on new S1
scenes, on S2 (held-out values of the same families) and the confusions, for the toy world's SigLIP stand-in (random
and frozen, as `examples/toyworld/build_default_model.py` builds it) or any SigLIP folder.

    python examples/toyworld/encoder_probe.py [--encoder FOLDER] [--pairs 80] [--hidden 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import SiglipVisionModel

from diffusers_delta.semantic_delta import SiglipPreprocessor, semantic_delta
from diffusers_delta.toyworld import SEEN_FAMILIES, changed_pair, render, split_edits
from diffusers_delta.toyworld.families import edits_by_family


def build_random_encoder(seed: int) -> SiglipVisionModel:
    """The toy world's SigLIP stand-in as `build_default_model.py` builds it: random, frozen."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_default_model import image_encoder_config

    torch.manual_seed(seed)
    return SiglipVisionModel(image_encoder_config()).eval()


@torch.no_grad()
def deltas(encoder: SiglipVisionModel, split: str, pairs_per_family: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Flattened semantic deltas (N, P * D) of pairs of every family of a split, and their families."""
    preprocessor = SiglipPreprocessor(encoder.config.image_size)
    sources, targets, labels = [], [], []
    for family, edits in sorted(edits_by_family(split_edits(split)).items()):
        for index in range(pairs_per_family):
            scene, edited = changed_pair(edits[index % len(edits)], seed + 7919 * index, encoder.config.image_size)
            sources.append(render(scene))
            targets.append(render(edited))
            labels.append(family)

    def pixels(images):
        return preprocessor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0)

    delta = torch.cat(
        [
            semantic_delta(encoder, pixels(sources[i : i + 64]), pixels(targets[i : i + 64]))
            for i in range(0, len(sources), 64)
        ]
    )  # (N, P, D)
    return delta.flatten(1), labels


def train_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, hidden: int = 0, steps: int = 300):
    """A linear probe (`hidden=0`) or a one-hidden-layer MLP, trained with Adam on all the features at once."""
    torch.manual_seed(0)
    if hidden:
        probe = torch.nn.Sequential(
            torch.nn.Linear(features.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes)
        )
    else:
        probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None, help="A SigLIP folder (default: the random stand-in).")
    parser.add_argument("--pairs", type=int, default=80, help="Training pairs per family.")
    parser.add_argument("--hidden", type=int, default=0, help="Hidden width of an MLP probe (0: linear).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    encoder = (
        SiglipVisionModel.from_pretrained(args.encoder).eval() if args.encoder else build_random_encoder(args.seed)
    )
    classes = sorted(SEEN_FAMILIES)
    train, train_labels = deltas(encoder, "S1", args.pairs, seed=args.seed)
    mean, std = train.mean(0), train.std(0) + 1e-6
    labels = torch.tensor([classes.index(c) for c in train_labels])
    probe = train_probe((train - mean) / std, labels, len(classes), args.hidden)
    for split, seed in (("S1", args.seed + 1_000), ("S2", args.seed + 2_000)):
        test, test_labels = deltas(encoder, split, 30, seed=seed)
        predicted = probe((test - mean) / std).argmax(1).tolist()
        correct = {c: [] for c in classes if c in test_labels}  # (S2 holds out no value of some families: flip)
        for label, guess in zip(test_labels, predicted):
            correct[label].append(classes[guess] == label)
        accuracy = np.mean([np.mean(v) for v in correct.values()])
        print(f"{split}: family accuracy {accuracy:.2f} (chance {1 / len(classes):.2f})")
        print("   " + ", ".join(f"{c} {np.mean(v):.2f}" for c, v in correct.items()))


if __name__ == "__main__":
    main()
