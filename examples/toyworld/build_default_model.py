#!/usr/bin/env python
"""Build the toy world's default model from scratch: VAE, base editor, SigLIP stand-in, Delta-Adapter.

One seeded command, about 55 minutes on 2 CPU cores (45 more with `--ablations`); not part of the test suite:

    python examples/toyworld/build_default_model.py --work_dir toy-build [--ablations]

Steps: train the VAE (train_vae.py), train the base editor (train_base_editor.py), make a small SigLIP stand-in, write
pairs of the *seen* edits, train the adapter with examples/train_delta_adapter.py itself, export the pipeline and
adapter folders into the package (`diffusers_delta/toyworld/default_model`, which `toyworld.load_pipeline()` loads),
with `--ablations` train the ablation adapters (no consistency loss; pooled MLP), and print
examples/toyworld/world1_quality.py's table.
`--work_dir` keeps every intermediate result; a step whose output already exists is skipped.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from diffusers_delta import DeltaAdapterModel, toyworld
from diffusers_delta.atomic_folder import atomic_folder
from diffusers_delta.hub import render_model_card
from diffusers_delta.toyworld import showcase


HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import train_base_editor  # noqa: E402
import train_delta_adapter  # noqa: E402
import train_vae  # noqa: E402


PACKAGE_MODEL_DIR = Path(toyworld.__file__).resolve().parent / "default_model"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--export_dir", default=str(PACKAGE_MODEL_DIR), help="Where the shipped model goes.")
    # Step counts, not minutes, so that the build is a function of the seed (minutes on 2 cores: VAE ~8, base ~22,
    # adapter ~21).
    parser.add_argument("--vae_steps", type=int, default=700)
    parser.add_argument("--base_steps", type=int, default=2965)
    parser.add_argument("--edited_fraction", type=float, default=0.5,
                        help="Share of the VAE's and base editor's scenes shown after a random edit.")  # fmt: skip
    parser.add_argument("--instruction_fraction", type=float, default=0.5,
                        help="Share of the base editor's references edited by an instruction.")  # fmt: skip
    parser.add_argument("--pairs_per_edit", type=int, default=2500)
    parser.add_argument("--adapter_steps", type=int, default=4000)
    parser.add_argument("--lambda_delta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="Also train the ablation adapters the benchmark compares the shipped one with (as long as it each).",
    )
    parser.add_argument("--skip_benchmark", action="store_true", help="Do not print the quality table at the end.")
    return parser.parse_args(argv)


def image_encoder_config() -> SiglipVisionConfig:
    """The toy world's SigLIP: 64x64 inputs in 8x8 patches, 64 patch tokens of 64 features, 2 layers."""
    return SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )


def build_image_encoder(folder: Path, seed: int) -> None:
    """The toy world's SigLIP (`image_encoder_config`), random and frozen."""
    torch.manual_seed(seed)
    SiglipVisionModel(image_encoder_config()).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)


def adapter_arguments(args, work: Path, output: Path, lambda_delta: float, projection: str = "perceiver") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(work / "base"), "--image_encoder", str(work / "siglip"),
        "--empty_prompt_embeds", str(work / "base" / "empty_prompt_embeds.safetensors"),
        "--train_data_dir", str(work / "pairs"), "--cache_latents", "--resolution", str(toyworld.IMAGE_SIZE),
        "--cache_latents_dir", str(work / "encoded_pairs"),  # a resumed build reads its pairs back, not encodes them
        "--num_edit_tokens", "16", "--resampler_dim", "128", "--resampler_depth", "2", "--resampler_heads", "4",
        "--train_batch_size", "16", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "50",
        "--max_train_steps", str(args.adapter_steps), "--checkpointing_steps", "500", "--checkpoints_total_limit", "1",
        "--lambda_delta", str(lambda_delta), "--weighting_scheme", "logit_normal", "--seed", str(args.seed),
        "--projection_type", projection, "--report_to", "none", "--output_dir", str(output),
        "--resume_from_checkpoint", "latest",  # a build cut off goes on from the adapter's last checkpoint
    ]  # fmt: skip


#: The benchmarks' ablations, as (consistency-loss weight, projection): the same adapter without the consistency loss,
#: and with RelationAdapter's pooled SigLIP + MLP in place of the Perceiver and per-token projection.
ABLATIONS = {"no_consistency": (0.0, "perceiver"), "pooled_mlp": (1.0, "pooled_mlp")}


def train_ablations(args, work: Path) -> None:
    """Trains each of `ABLATIONS` into `work/adapter_<name>` as the main adapter is trained (same data, steps and
    seed); one that is complete is skipped, one cut off resumes from its checkpoints."""
    for name, (lambda_delta, projection) in ABLATIONS.items():
        output = work / f"adapter_{name}"
        if not (output / "diffusion_pytorch_model.safetensors").exists():
            print(f"ablation: adapter_{name}")
            train_delta_adapter.main(
                train_delta_adapter.parse_args(adapter_arguments(args, work, output, lambda_delta, projection))
            )


def export(work: Path, export_dir: Path, max_bytes: int | None = None) -> None:
    """Copies the base pipeline (with its edit prompts, for the benchmark) and the adapter folder (weights, SigLIP,
    empty prompt) into the package, atomically: the model there stays whole until the new one is complete.

    Args:
        work: the build folder (`base/`, `adapter/`).
        export_dir: where the shipped model goes.
        max_bytes: refuse (and keep the old model) when the new one is bigger.
    """
    with atomic_folder(export_dir, owned=("base", "adapter")) as staging:
        shutil.copytree(work / "base", staging / "base", ignore=shutil.ignore_patterns("empty_prompt_embeds.*"))
        shutil.copytree(
            work / "adapter",
            staging / "adapter",
            ignore=shutil.ignore_patterns("checkpoint-*", "logs", "training_summary.json"),
        )
        write_toy_card(staging / "adapter", toyworld.model_world(staging))
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        if max_bytes is not None and size > max_bytes:
            raise RuntimeError(
                f"The model to export is {size / 2**20:.1f} MiB, over {max_bytes / 2**20:.0f} MiB; {export_dir} is "
                "unchanged."
            )
    print(f"Exported the default model to {export_dir} ({size / 2**20:.1f} MiB)")


def write_toy_card(adapter_dir: Path, world: str) -> None:
    """Rewrites the exported adapter's card for what ships: its snippet loads `toyworld.load_pipeline()` and shows the
    first of the world's demo edits, and it names no folder of the build; the training settings of the training
    script's card are kept."""
    card_path = adapter_dir / "README.md"
    settings = card_path.read_text(encoding="utf-8").split("## Training", 1)[-1] if card_path.is_file() else ""
    training = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", settings, re.M)[2:]) or None  # past the header rows
    card = render_model_card(
        DeltaAdapterModel.from_pretrained(adapter_dir),
        repo_id="the toy world's adapter",
        base_model="the toy world's base editor",
        image_encoder="the toy world's SigLIP stand-in",
        license="apache-2.0",
        training=training,
        toyworld_edit=showcase.DEMO_ROWS[world][0][0],
    )
    card.save(card_path)


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # Each step writes into a staging folder swapped in when complete: a step's folder exists only whole.
    if not (work / "vae").exists():
        with atomic_folder(work / "vae") as staging:
            train_vae.main(train_vae.parse_args([
                "--output_dir", str(staging), "--max_steps", str(args.vae_steps), "--minutes", "1e9",
                "--seed", str(args.seed), "--edited_fraction", str(args.edited_fraction),
            ]))  # fmt: skip
    if not (work / "base").exists():
        with atomic_folder(work / "base") as staging:
            train_base_editor.main(train_base_editor.parse_args([
                "--vae_dir", str(work / "vae"), "--output_dir", str(staging), "--max_steps", str(args.base_steps),
                "--minutes", "1e9", "--seed", str(args.seed), "--edited_fraction", str(args.edited_fraction),
                "--instruction_fraction", str(args.instruction_fraction),
            ]))  # fmt: skip
    if not (work / "siglip").exists():
        with atomic_folder(work / "siglip") as staging:
            build_image_encoder(staging, args.seed)
    if not (work / "pairs").exists():
        with atomic_folder(work / "pairs") as staging:
            toyworld.write_pairs(staging, toyworld.SEEN_EDITS, args.pairs_per_edit, seed=args.seed)
    if not (work / "adapter" / "diffusion_pytorch_model.safetensors").exists():
        train_delta_adapter.main(
            train_delta_adapter.parse_args(adapter_arguments(args, work, work / "adapter", args.lambda_delta))
        )
    export(work, Path(args.export_dir))

    if args.ablations:
        train_ablations(args, work)
    if not args.skip_benchmark:
        subprocess.run(
            [sys.executable, str(HERE / "world1_quality.py"), "--model_dir",
             args.export_dir, "--work_dir", str(work)],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main(parse_args())
