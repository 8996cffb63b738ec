#!/usr/bin/env python
"""Build toy world 2's model in resumable stages: VAE, instruction base editor, SigLIP stand-in, S1 pairs, adapter.

    python examples/toyworld/build_world2.py --work_dir toy2 [--pretrain_encoder] [--ablations] [--export]

Every stage writes one folder of `--work_dir`, which exists only complete, and is skipped when it is there, so a build
cut off by a session's end goes on where it stopped. The training stages also resume from their checkpoints: the VAE's
and the base editor's (`vae_checkpoint/`, `base_checkpoint/`, every `--vae_checkpointing_steps` and
`--base_checkpointing_steps` steps, each removed once its stage is complete) and the adapter's. Each run first prints
which parts are done and an estimate of the training time left. The VAE and the base editor learn every family of
every split (klein knows every edit by text); the adapter trains on S1 only, and so do the ablation adapters of
`--ablations` (`adapter_no_consistency`, `adapter_pooled_mlp`, which `examples/toyworld/world2_quality.py` compares it
with).
Nothing in the package changes unless `--export` is given: then the base pipeline and the adapter replace
`diffusers_delta/toyworld/default_model` (the shipped model, at most 25 MB) atomically.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from diffusers_delta import toyworld
from diffusers_delta.atomic_folder import atomic_folder


HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import build_default_model  # noqa: E402
import pretrain_image_encoder  # noqa: E402
import train_base_editor  # noqa: E402
import train_delta_adapter  # noqa: E402
import train_vae  # noqa: E402


MAX_EXPORT_BYTES = 25 * 2**20
#: Seconds a training step of each part takes on 2 CPU cores, each part on 1 thread beside a second job (the third
#: build: the VAE's 1500 steps took 61 minutes, the base editor with --base_reuse 4 ran at 1.2-1.7 steps/s, the adapter
#: at 16 pairs a step 1.05-1.1 steps/s), for the estimate of what is left.
SECONDS_PER_STEP = {"vae": 2.4, "base": 0.7, "encoder": 0.3, "adapter": 0.95}


def progress(args: argparse.Namespace, work: Path) -> list[tuple[str, int, int, str]]:
    """Where a build stands: (part, steps done, steps in all, its timing key) for every part it trains."""
    import torch

    def stage_done(stage: str, steps: int) -> int:  # complete, or where its checkpoint stands
        if (work / stage).is_dir():
            return steps
        state = work / f"{stage}_checkpoint" / train_base_editor.CHECKPOINT_STATE_NAME
        return torch.load(state, weights_only=True)["step"] if state.is_file() else 0

    def adapter_done(folder: Path, steps: int) -> int:
        if (folder / "diffusion_pytorch_model.safetensors").is_file():
            return steps
        steps_saved = train_delta_adapter.checkpoint_steps(str(folder))
        return steps_saved[-1] if steps_saved else 0

    parts = [
        ("VAE", stage_done("vae", args.vae_steps), args.vae_steps, "vae"),
        ("base editor", stage_done("base", args.base_steps), args.base_steps, "base"),
    ]
    if args.pretrain_encoder:
        encoder_done = args.encoder_steps if (work / "siglip").is_dir() else 0
        parts.append(("SigLIP stand-in", encoder_done, args.encoder_steps, "encoder"))
    adapters = ["adapter"] + ([f"adapter_{name}" for name in build_default_model.ABLATIONS] if args.ablations else [])
    for name in adapters:
        parts.append((name, adapter_done(work / name, args.adapter_steps), args.adapter_steps, "adapter"))
    return parts


def report_progress(args: argparse.Namespace, work: Path) -> None:
    """Prints which parts of the build are done, and about how long the rest takes on 2 CPU cores."""
    parts = progress(args, work)
    left = sum((total - done) * SECONDS_PER_STEP[key] for _, done, total, key in parts)
    states = ", ".join(
        f"{name} {'done' if done >= total else f'{done}/{total} steps'}" for name, done, total, _ in parts
    )
    print(f"build in {work}: {states}; about {left / 3600:.1f} h of training left on 2 CPU cores")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="Where every stage's folder goes.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds every stage.")
    parser.add_argument("--vae_steps", type=int, default=1500, help="VAE training steps.")
    parser.add_argument("--vae_checkpointing_steps", type=int, default=200,
                        help="VAE steps between two checkpoints (about 9 minutes on 1 thread).")  # fmt: skip
    parser.add_argument("--base_steps", type=int, default=25000, help="Base editor training steps.")
    parser.add_argument(
        "--pretrain_encoder",
        action="store_true",
        help="Pre-train the SigLIP stand-in (masked patch reconstruction) instead of a random one.",
    )
    parser.add_argument("--encoder_steps", type=int, default=10_000, help="Pre-training steps of the encoder.")
    parser.add_argument("--pairs_per_family", type=int, default=400, help="Training pairs of each S1 family.")
    parser.add_argument("--adapter_steps", type=int, default=16000, help="Adapter training steps.")
    parser.add_argument("--lambda_delta", type=float, default=1.0, help="Weight of the consistency loss.")
    parser.add_argument("--base_layers", type=int, default=2,
                        help="Double-stream blocks of the base editor, and as many single-stream ones.")  # fmt: skip
    parser.add_argument("--base_heads", type=int, default=4, help="Attention heads (of 32) of the base editor.")
    parser.add_argument("--base_reuse", type=int, default=4,
                        help="Uses of each encoded example by the base editor (its --reuse).")  # fmt: skip
    parser.add_argument("--base_checkpointing_steps", type=int, default=500,
                        help="Base editor steps between two checkpoints (a cut-off build resumes there).")  # fmt: skip
    parser.add_argument("--ablations", action="store_true",
                        help="Also train the ablation adapters: no consistency loss; pooled MLP.")  # fmt: skip
    parser.add_argument("--export", action="store_true", help="Replace the shipped model with this build's.")
    parser.add_argument("--export_dir", default=str(build_default_model.PACKAGE_MODEL_DIR),
                        help="Where --export puts the model (default: the package's, which ships).")  # fmt: skip
    return parser.parse_args(argv)


@contextmanager
def build_lock(work: Path):
    """Holds `work/.build.lock` while the build runs: a second build of the same folder is refused, not interleaved
    with the first (their checkpoints and stages would mix)."""
    with open(work / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"Another build is running in {work} (it holds {work / '.build.lock'}): wait for it, or stop it first."
            ) from None
        yield  # the lock goes with the file's closing, and with the process, however it ends


def remove_stale_staging(work: Path) -> None:
    """Removes the staging folders (`atomic_folder`'s `.NAME.tmp-*`: `.base.tmp-*`, ...) a build killed in the
    middle of a stage left behind; with the lock held, none of them is in use."""
    for leftover in work.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with build_lock(work):
        remove_stale_staging(work)
        build(args, work)


def build(args: argparse.Namespace, work: Path) -> None:
    """The stages, each skipped when its folder is complete."""
    seed = str(args.seed)
    report_progress(args, work)
    # Stages 1-4 write into a staging folder swapped in when complete: a stage's folder exists only whole.
    if not (work / "vae").is_dir():
        print("stage 1/5: VAE")
        with atomic_folder(work / "vae") as staging:
            train_vae.main(train_vae.parse_args([
                "--output_dir", str(staging), "--max_steps", str(args.vae_steps), "--minutes", "1e9", "--seed", seed,
                "--world", "families", "--block_out_channels", "32", "64", "64", "--l1_weight", "0.5",
                "--lr_scheduler", "cosine", "--checkpoint_dir", str(work / "vae_checkpoint"),
                "--checkpointing_steps", str(args.vae_checkpointing_steps),
            ]))  # fmt: skip
    shutil.rmtree(work / "vae_checkpoint", ignore_errors=True)  # vae/ is complete: its checkpoint is spent
    base_checkpoint = work / "base_checkpoint"
    if not (work / "base").is_dir():
        print("stage 2/5: instruction base editor")
        with atomic_folder(work / "base") as staging:
            train_base_editor.main(train_base_editor.parse_args([
                "--vae_dir", str(work / "vae"), "--output_dir", str(staging), "--max_steps", str(args.base_steps),
                "--minutes", "1e9", "--seed", seed, "--edited_fraction", "0.5", "--instruction_fraction", "0.7",
                "--world", "families", "--lr_scheduler", "cosine", "--num_layers", str(args.base_layers),
                "--num_single_layers", str(args.base_layers), "--num_attention_heads", str(args.base_heads),
                "--checkpoint_dir", str(base_checkpoint), "--checkpointing_steps", str(args.base_checkpointing_steps),
                "--reuse", str(args.base_reuse),
            ]))  # fmt: skip
    shutil.rmtree(base_checkpoint, ignore_errors=True)  # base/ is complete: its checkpoint is spent
    if not (work / "siglip").is_dir():
        print("stage 3/5: SigLIP stand-in")
        with atomic_folder(work / "siglip") as staging:
            if args.pretrain_encoder:
                pretrain_image_encoder.main(pretrain_image_encoder.parse_args([
                    "--output_dir", str(staging), "--max_steps", str(args.encoder_steps), "--minutes", "1e9",
                    "--seed", seed,
                ]))  # fmt: skip
            else:
                build_default_model.build_image_encoder(staging, args.seed)
    if not (work / "pairs").is_dir():
        print("stage 4/5: S1 pairs")
        with atomic_folder(work / "pairs") as staging:
            toyworld.write_family_pairs(staging, "S1", args.pairs_per_family, seed=args.seed)
    if not (work / "adapter" / "diffusion_pytorch_model.safetensors").is_file():  # resumes from its checkpoints
        print("stage 5/5: adapter")
        train_delta_adapter.main(train_delta_adapter.parse_args(
            build_default_model.adapter_arguments(args, work, work / "adapter", args.lambda_delta)
        ))  # fmt: skip
    if args.ablations:
        build_default_model.train_ablations(args, work)
    if args.export:
        build_default_model.export(work, Path(args.export_dir), max_bytes=MAX_EXPORT_BYTES)


if __name__ == "__main__":
    main(parse_args())
