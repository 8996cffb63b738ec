#!/usr/bin/env python
"""Build toy world 3's model in resumable stages: world 2's parts, the VAE and the told base editor fine-tuned on the
edit space, the training pairs (a fresh edit each), the adapter.

    python examples/toyworld/build_world3.py --work_dir toy3 [--pooled] [--export]

World 3 (`diffusers_delta.toyworld.edit_space`) keeps world 2's scenes, so it starts from world 2's model (the shipped
one by default, copied into `--work_dir/world2` first, so that an export during the build changes nothing): its VAE
is fine-tuned on pictures the space edits (colours off the palette, ramps, blurs), its base editor's transformer
starts from world 2's and learns to read each edit's parameter vector through a new instruction encoder (every edit:
sampled ones and the held-out ones, as klein knows "sepia" by text), and its SigLIP stand-in is kept. The adapter
trains on `--pairs` pairs, no two of which share an edit; with `--pooled` the pooled-MLP ablation trains on the same
pairs (the dense-against-pooled comparison of `world3_quality.py`, beside this script).

Every stage writes one folder of `--work_dir`, which exists only complete, and is skipped when it is there; the VAE,
the base editor and the adapters also resume from their checkpoints (at most 500 steps, under 10 minutes, apart), so a
build cut off by a session's end goes on where it stopped when the same command runs again. Each run first prints
where the build stands. Nothing in the package changes unless `--export` is given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from diffusers_delta import toyworld
from diffusers_delta.atomic_folder import atomic_folder
from diffusers_delta.toyworld import showcase


HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import build_default_model  # noqa: E402
import build_world2  # noqa: E402
import train_base_editor  # noqa: E402
import train_delta_adapter  # noqa: E402
import train_vae  # noqa: E402


#: Seconds a training step of each part takes on 2 CPU cores beside a second job (world 2's third build).
SECONDS_PER_STEP = {"vae": 2.4, "base": 0.7, "adapter": 0.95}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="Where every stage's folder goes.")
    parser.add_argument("--world2_dir", default=str(build_default_model.PACKAGE_MODEL_DIR),
                        help="World 2's model folder (base/, adapter/) the build starts from: the package's while it "
                        "was world 2's; since world 3 ships, a world-2 build's folder (build_world2.py --work_dir "
                        "toy2, then --world2_dir toy2).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="Seeds every stage.")
    parser.add_argument("--vae_steps", type=int, default=600, help="Fine-tuning steps of world 2's VAE.")
    parser.add_argument("--base_steps", type=int, default=12000, help="Base editor training steps.")
    parser.add_argument("--base_reuse", type=int, default=4,
                        help="Uses of each encoded example by the base editor (its --reuse).")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=24000, help="Training pairs, each its own edit.")
    parser.add_argument("--adapter_steps", type=int, default=16000, help="Adapter training steps.")
    parser.add_argument("--lambda_delta", type=float, default=1.0, help="Weight of the consistency loss.")
    parser.add_argument("--pooled", action="store_true", help="Also train the pooled-MLP ablation adapter.")
    parser.add_argument("--pooled_steps", type=int, default=None,
                        help="Its training steps (default: --adapter_steps). Fewer is compared with the adapter's "
                        "checkpoint of the same step (world3_quality.py --adapter), as the dense-against-pooled "
                        "comparison at equal training.")  # fmt: skip
    parser.add_argument("--export", action="store_true", help="Replace the shipped model with this build's.")
    parser.add_argument("--export_dir", default=str(build_default_model.PACKAGE_MODEL_DIR),
                        help="Where --export puts the model (default: the package's, which ships).")  # fmt: skip
    return parser.parse_args(argv)


def adapter_steps(args: argparse.Namespace) -> dict[str, int]:
    """The adapters the build trains, with their training steps: the adapter, and with `--pooled` the ablation."""
    pooled = {"adapter_pooled_mlp": args.pooled_steps or args.adapter_steps} if args.pooled else {}
    return {"adapter": args.adapter_steps} | pooled


def report_progress(args: argparse.Namespace, work: Path) -> None:
    """Prints which parts of the build are done, and about how long the rest takes on 2 CPU cores."""
    import torch

    def stage_done(stage: str, steps: int) -> int:
        if (work / stage).is_dir():
            return steps
        state = work / f"{stage}_checkpoint" / train_base_editor.CHECKPOINT_STATE_NAME
        return torch.load(state, weights_only=True)["step"] if state.is_file() else 0

    def adapter_done(folder: Path, steps: int) -> int:
        if (folder / "diffusion_pytorch_model.safetensors").is_file():
            return steps
        saved = train_delta_adapter.checkpoint_steps(str(folder))
        return saved[-1] if saved else 0

    parts = [("VAE", stage_done("vae", args.vae_steps), args.vae_steps, "vae"),
             ("base editor", stage_done("base", args.base_steps), args.base_steps, "base")]  # fmt: skip
    for name, steps in adapter_steps(args).items():
        parts.append((name, adapter_done(work / name, steps), steps, "adapter"))
    left = sum((total - done) * SECONDS_PER_STEP[key] for _, done, total, key in parts)
    states = ", ".join(f"{n} {'done' if d >= t else f'{d}/{t} steps'}" for n, d, t, _ in parts)
    print(f"build in {work}: {states}; about {left / 3600:.1f} h of training left on 2 CPU cores", flush=True)


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with build_world2.build_lock(work):
        build_world2.remove_stale_staging(work)
        build(args, work)


def build(args: argparse.Namespace, work: Path) -> None:
    """The stages, each skipped when its folder is complete."""
    seed = str(args.seed)
    report_progress(args, work)
    if not (work / "world2").is_dir():
        source = Path(args.world2_dir)
        if toyworld.model_world(source) != showcase.WORLD_2:
            raise SystemExit(
                f"error: {source} holds no world-2 model; build one (python examples/toyworld/build_world2.py "
                "--work_dir toy2) and pass --world2_dir toy2."
            )
        print("stage 1/6: world 2's model")
        with atomic_folder(work / "world2") as staging:
            for part in ("base", "adapter"):
                shutil.copytree(source / part, staging / part)
    world2 = work / "world2"
    if not (work / "vae").is_dir():
        print("stage 2/6: VAE, fine-tuned on the edit space")
        with atomic_folder(work / "vae") as staging:
            train_vae.main(train_vae.parse_args([
                "--output_dir", str(staging), "--init_from", str(world2 / "base" / "vae"), "--world", "space",
                "--max_steps", str(args.vae_steps), "--minutes", "1e9", "--seed", seed, "--edited_fraction", "0.5",
                "--learning_rate", "3e-4", "--l1_weight", "0.5", "--lr_scheduler", "cosine",
                "--checkpoint_dir", str(work / "vae_checkpoint"), "--checkpointing_steps", "200",
            ]))  # fmt: skip
    shutil.rmtree(work / "vae_checkpoint", ignore_errors=True)  # vae/ is complete: its checkpoint is spent
    if not (work / "base").is_dir():
        print("stage 3/6: told base editor, from world 2's")
        with atomic_folder(work / "base") as staging:
            train_base_editor.main(train_base_editor.parse_args([
                "--vae_dir", str(work / "vae"), "--output_dir", str(staging), "--world", "space",
                "--init_transformer", str(world2 / "base" / "transformer"), "--max_steps", str(args.base_steps),
                "--minutes", "1e9", "--seed", seed, "--edited_fraction", "0.5", "--instruction_fraction", "0.7",
                "--lr_scheduler", "cosine", "--checkpoint_dir", str(work / "base_checkpoint"),
                "--checkpointing_steps", "500", "--reuse", str(args.base_reuse),
            ]))  # fmt: skip
    shutil.rmtree(work / "base_checkpoint", ignore_errors=True)
    if not (work / "siglip").is_dir():
        print("stage 4/6: SigLIP stand-in (world 2's)")
        with atomic_folder(work / "siglip") as staging:
            shutil.copytree(world2 / "adapter" / "image_encoder", staging, dirs_exist_ok=True)
    if not (work / "pairs").is_dir():
        print(f"stage 5/6: {args.pairs} training pairs, each its own edit")
        with atomic_folder(work / "pairs") as staging:
            toyworld.write_space_pairs(staging, args.pairs, seed=args.seed)
    projections = {"adapter": "perceiver", "adapter_pooled_mlp": "pooled_mlp"}
    for name, steps in adapter_steps(args).items():
        if not (work / name / "diffusion_pytorch_model.safetensors").is_file():  # resumes from its checkpoints
            print(f"stage 6/6: {name}")
            run = argparse.Namespace(**{**vars(args), "adapter_steps": steps})
            train_delta_adapter.main(train_delta_adapter.parse_args(build_default_model.adapter_arguments(
                run, work, work / name, args.lambda_delta, projections[name]
            )))  # fmt: skip
    if args.export:
        build_default_model.export(work, Path(args.export_dir), max_bytes=build_world2.MAX_EXPORT_BYTES)


if __name__ == "__main__":
    main(parse_args())
