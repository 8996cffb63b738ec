#!/usr/bin/env python
"""Train the toy world's stand-in for FLUX.2 [klein]: a small `Flux2Transformer2DModel` that edits its reference image
by instruction, and reproduces it with the empty one.

FLUX.2 [klein] edits an image it receives as reference tokens, as a text prompt says; with the empty prompt it
reproduces it. This trains that behaviour from scratch on generated scenes (flow matching): a share of the references
(`--instruction_fraction`) is edited by one of the toy world's edits, seen and unseen alike (a text-conditioned editor
knows them all; *unseen* means unseen by the adapter), the rest reproduced. There is no text encoder in the toy world:
each instruction is a learned prompt, trained alongside. Writes a pipeline folder (read by
`FluxDeltaEditPipeline.from_pretrained`), `empty_prompt_embeds.safetensors` and `edit_prompt_embeds.safetensors` (one
prompt per edit, for the benchmark's text-instruction row); prints the PSNR of 4-step reproductions of held-out scenes
against the VAE's own reconstruction floor, and each instruction's gap closed.

    python examples/toyworld/train_base_editor.py --vae_dir toy/vae --output_dir toy/base --minutes 9

With `--checkpoint_dir`, the training state (weights, optimizer, schedule, data stream) is written there every
`--checkpointing_steps` steps and when the time budget ends, and a run started with the same flags resumes from it
exactly: a long base editor trains across several runs, each cut off wherever a session ends. `--reuse 4` encodes each
training example once and uses it four times (`ExamplePool`), which makes a step about 1.7 times cheaper on 2 CPU cores
(`examples/toyworld/world2_base_speed.py`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.adapter_files import EMPTY_PROMPT_EMBEDS_NAME
from diffusers_delta.atomic_folder import atomic_folder
from diffusers_delta.backbones.flux2 import encode_latents, predict_velocity
from diffusers_delta.losses import add_noise, flow_matching_loss, sample_sigmas
from diffusers_delta.toyworld import (
    EDIT_PROMPT_EMBEDS_NAME,
    EDITS,
    FAMILIES,
    IMAGE_SIZE,
    SPLITS,
    changed_pair,
    edit_space,
    generate_family_scene,
    generate_scene,
    instruction_batch,
    instruction_vector,
    render,
    render_batch,
    space_batch,
    split_edits,
    world_batch,
)
from diffusers_delta.toyworld.families import INSTRUCTION_WIDTH, edits_by_family
from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder


PROMPT_TOKENS, PROMPT_DIM = 8, 64
CHECKPOINT_WEIGHTS_NAME, CHECKPOINT_STATE_NAME = "model.safetensors", "training_state.pt"
# The flags a checkpoint must be resumed with: any other value would train a different model from its state.
RESUME_FLAGS = (
    "world", "batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps", "edited_fraction",
    "instruction_fraction", "num_layers", "num_single_layers", "num_attention_heads", "seed", "reuse", "pool_batches",
    "families", "init_transformer",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae_dir", required=True, help="Output folder of train_vae.py.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--minutes", type=float, default=9.0, help="Wall-clock budget for training.")
    parser.add_argument("--max_steps", type=int, default=None, help="Stop after this many steps (for tests).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lr_scheduler", default="constant", choices=["constant", "cosine"],
                        help="cosine: warm up, then decay to zero at --max_steps (which it needs).")  # fmt: skip
    parser.add_argument("--lr_warmup_steps", type=int, default=200, help="Warm-up steps of the cosine schedule.")
    parser.add_argument("--edited_fraction", type=float, default=0.0,
                        help="Share of training scenes shown after a random edit.")  # fmt: skip
    parser.add_argument("--instruction_fraction", type=float, default=0.5,
                        help="Share of references edited by an instruction (0: a pure reproducer).")  # fmt: skip
    parser.add_argument("--num_layers", type=int, default=2, help="Double-stream blocks.")
    parser.add_argument("--num_single_layers", type=int, default=2, help="Single-stream blocks.")
    parser.add_argument("--num_attention_heads", type=int, default=4, help="Attention heads of 32 features.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", type=int, default=1,
                        help="Uses of each encoded example (1: a fresh batch every step).")  # fmt: skip
    parser.add_argument("--pool_batches", type=int, default=64,
                        help="Batches encoded at once and reused (with --reuse above 1).")  # fmt: skip
    parser.add_argument("--checkpoint_dir", default=None,
                        help="Where the training state is kept, and resumed from when it is there.")  # fmt: skip
    parser.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Steps between two checkpoints (with --checkpoint_dir).")  # fmt: skip
    parser.add_argument(
        "--world",
        default="edits",
        choices=["edits", "families", "space"],
        help="edits: the shipped world's eight edits, each a learned prompt; families: toy world 2's parameterised "
        "edit families (every split), read through a learned InstructionEncoder from structured instructions; space: "
        "toy world 3's continuous edit space (sampled and held-out edits), read from each edit's parameter vector.",
    )
    parser.add_argument("--init_transformer", default=None,
                        help="A transformer folder to start from (its architecture replaces --num_layers, "
                        "--num_single_layers and --num_attention_heads): world 3 starts from world 2's "
                        "base.")  # fmt: skip
    parser.add_argument("--report_queries", type=int, default=4,
                        help="Worlds 2 and 3: queries per edit of the closing report (the told base's gaps).")
    parser.add_argument("--families", nargs="+", default=None, choices=sorted(FAMILIES),
                        help="World 2 only: train on these families alone (default: every family).")  # fmt: skip
    args = parser.parse_args(argv)
    if args.families and args.world != "families":
        parser.error("--families needs --world families.")
    for flag in ("checkpointing_steps", "reuse", "pool_batches", "report_queries"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    return args


def build_transformer(
    latent_channels: int, num_layers: int = 2, num_single_layers: int = 2, num_attention_heads: int = 4
) -> Flux2Transformer2DModel:
    """FLUX.2 [klein]'s architecture at toy scale: by default 2 double + 2 single blocks, 4 heads of 32.

    Args:
        latent_channels: the VAE's latent channels (the transformer reads 2x2 patches of them).
        num_layers: double-stream blocks.
        num_single_layers: single-stream blocks.
        num_attention_heads: heads of 32 features.
    """
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=32,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=PROMPT_DIM,
        timestep_guidance_channels=64,
        mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    )


def klein_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )


@torch.no_grad()
def edit_images(pipe: Flux2KleinPipeline, prompt_embeds: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """4-step edits (B, 3, H, W) in [0, 1] of `images` (B, 3, H, W) in [-1, 1] under one prompt (1, L, D_txt) or one
    each (B, L, D_txt)."""
    import PIL.Image

    outputs = []
    for index, image in enumerate(images):
        pil = PIL.Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        generator = torch.Generator().manual_seed(index)
        prompt = prompt_embeds[index : index + 1] if prompt_embeds.shape[0] > 1 else prompt_embeds
        output = pipe(image=pil, prompt_embeds=prompt, num_inference_steps=4, guidance_scale=1.0,
                      generator=generator, output_type="pt").images  # fmt: skip
        outputs.append(output[0])
    return torch.stack(outputs)


@torch.no_grad()
def report(pipe: Flux2KleinPipeline, prompts: torch.Tensor, seed: int, count: int = 16) -> None:
    """Prints the reproduction PSNR against the VAE's floor, and each instruction's mean absolute error on held-out
    scenes with its gap closed, (identity - output) / (identity - floor)."""
    rng = np.random.default_rng(seed)
    scenes = [generate_scene(rng) for _ in range(count)]
    references = render_batch(scenes)  # (B, 3, H, W) in [-1, 1]
    truth = (references + 1) / 2

    def reconstruct(images):
        return (pipe.vae.decode(pipe.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2

    def psnr(estimate):
        return 10 * math.log10(1.0 / F.mse_loss(estimate, truth).item())

    reproduced = edit_images(pipe, prompts[:1], references)
    print(f"reproduction PSNR {psnr(reproduced):.1f} dB (VAE floor {psnr(reconstruct(references)):.1f} dB)")
    for index, name in enumerate(EDITS, start=1):
        edited = (render_batch([EDITS[name](scene) for scene in scenes]) + 1) / 2  # (B, 3, H, W) in [0, 1]
        identity, floor = (
            (truth - edited).abs().mean().item(),
            (reconstruct(edited * 2 - 1) - edited).abs().mean().item(),
        )
        output = (edit_images(pipe, prompts[index : index + 1], references) - edited).abs().mean().item()
        gap = (identity - output) / (identity - floor)
        print(
            f"instruction {name:<10} error {output:.4f} (identity {identity:.4f}, floor {floor:.4f}): gap {gap:+.2f}"
        )


@torch.no_grad()
def gap_closed(pipe: Flux2KleinPipeline, prompts: torch.Tensor, pairs) -> tuple[float, float, float, float]:
    """How well the base editor does edits when told them.

    Args:
        pipe: the base editor's pipeline.
        prompts: (N, L, D_txt) each pair's instruction, encoded.
        pairs: N (scene, edited scene) pairs.

    Returns:
        The mean absolute error (0-1) of its 4-step output, of leaving the scene alone (identity) and of the VAE's
        reconstruction (floor), and the gap closed, (identity - output) / (identity - floor): NaN where the floor is
        above identity (too small an edit to measure).
    """
    sources = render_batch([scene for scene, _ in pairs])
    truth = torch.from_numpy(np.stack([render(edited) for _, edited in pairs])).permute(0, 3, 1, 2) / 255.0
    decoded = pipe.vae.decode(pipe.vae.encode(truth * 2 - 1).latent_dist.mode()).sample.clamp(-1, 1)
    identity = ((sources + 1) / 2 - truth).abs().mean().item()
    floor = ((decoded + 1) / 2 - truth).abs().mean().item()
    output = (edit_images(pipe, prompts, sources) - truth).abs().mean().item()
    gap = (identity - output) / (identity - floor) if identity > floor else float("nan")
    return output, identity, floor, gap


@torch.no_grad()
def report_space(pipe: Flux2KleinPipeline, encoder: InstructionEncoder, count: int = 4) -> None:
    """Toy world 3: the base editor's gap closed under the true instruction on evaluation scenes, for sampled edits
    and each held-out edit (its ceiling as the told base)."""
    rng = np.random.default_rng([edit_space.EVALUATION_SEED, 2])
    sampled = [edit_space.sample_pair(rng) for _ in range(4 * count)]
    pairs = [(scene, spec.edit()(scene)) for spec, scene in sampled]
    vectors = torch.from_numpy(np.stack([spec.vector() for spec, _ in sampled]))
    output, identity, floor, gap = gap_closed(pipe, encoder(vectors), pairs)
    print(f"sampled edits              error {output:.4f} (identity {identity:.4f}, floor {floor:.4f}): {gap:+.2f}")
    for name, spec in edit_space.HELD_OUT_EDITS.items():
        pairs = [edit_space.evaluation_pair(spec, i) for i in range(count)]
        prompts = encoder(torch.from_numpy(spec.vector())[None].expand(count, -1))
        output, identity, floor, gap = gap_closed(pipe, prompts, pairs)
        print(f"held out {name:<24} error {output:.4f} (identity {identity:.4f}, floor {floor:.4f}): {gap:+.2f}")


@torch.no_grad()
def gap_under_instruction(
    pipe: Flux2KleinPipeline, encoder: InstructionEncoder, edits: list, seed: int, count: int
) -> tuple[float, float, float, float]:
    """Toy world 2: how well the base editor does edits when told them, on `count` held-out scenes each edit changes
    (the edits taken in turn).

    Returns:
        The mean absolute error (0-1) of its 4-step output, of leaving the scene alone (identity) and of the VAE's
        reconstruction (floor), and the gap closed, (identity - output) / (identity - floor): NaN where the floor is
        above identity (too small an edit to measure).
    """
    pairs = [changed_pair(edits[i % len(edits)], seed + 100 * i, IMAGE_SIZE) for i in range(count)]
    prompts = encoder(torch.from_numpy(np.stack([instruction_vector(edits[i % len(edits)]) for i in range(count)])))
    return gap_closed(pipe, prompts, pairs)


@torch.no_grad()
def report_families(
    pipe: Flux2KleinPipeline, encoder: InstructionEncoder, seed: int, count: int = 4, families=None
) -> None:
    """Toy world 2: per split and family (every one, or `families` only), the base editor's error under the true
    instruction on held-out scenes, with its gap closed, (identity - output) / (identity - floor), and the
    reproduction PSNR."""
    reference_scenes = [generate_family_scene(np.random.default_rng(seed + i)) for i in range(count)]
    references = render_batch(reference_scenes)
    reproduced = edit_images(pipe, encoder.empty_prompt_embeds(), references)
    print(f"reproduction PSNR {10 * math.log10(1.0 / F.mse_loss(reproduced, (references + 1) / 2).item()):.1f} dB")
    for split in SPLITS:
        gaps = []
        for name, (edit, *_) in edits_by_family(split_edits(split)).items():  # the first edit of each family
            if families and name not in families:
                continue
            output, identity, floor, gap = gap_under_instruction(pipe, encoder, [edit], seed, count)
            gaps.append(gap)
            print(f"{split} {name:<22} error {output:.4f} (identity {identity:.4f}, floor {floor:.4f}): {gap:+.2f}")
        if not gaps:
            continue
        defined = [gap for gap in gaps if not math.isnan(gap)]  # undefined where identity is at the floor
        mean = f"{np.mean(defined):+.2f}" if defined else "undefined"
        print(f"{split} mean gap closed under the true instruction: {mean} (where defined)")


class ExamplePool:
    """The base editor's training examples, encoded by the VAE once and each used `reuse` times.

    Encoding a batch's references and targets costs about as much as the transformer's training step on it, so
    with `reuse` R > 1 a pool of `pool_batches` freshly drawn batches is encoded at once and served R times over, in
    R shuffled epochs (one permutation each, seeded by the run's seed, the pool's number and the epoch): the VAE runs
    once per R uses of an example, and every use gets its own noise and timestep. With R = 1 every step draws and
    encodes one fresh batch, as training did before pools.

    A pool is a function of the data stream's generator state when it was drawn, which `stream_state` gives for a
    checkpoint: a run resumed mid-pool draws and encodes it again and goes on exactly.

    Args:
        draw: the data stream's generator -> one batch: references (B, 3, H, W) and targets (B, 3, H, W) in [-1, 1],
            and the instructions (B, ...) as the prompt source reads them.
        vae: the frozen VAE.
        rng: the data stream's generator.
        pool_batches: batches per pool (with `reuse` 1: one).
        reuse: how many times each example is used.
        seed: seeds the epochs' permutations.
    """

    def __init__(
        self, draw, vae: AutoencoderKLFlux2, rng: np.random.Generator, pool_batches: int, reuse: int, seed: int
    ):
        self.draw, self.vae, self.rng, self.seed = draw, vae, rng, seed
        self.pool_batches, self.reuse = (pool_batches if reuse > 1 else 1), reuse
        self.number, self.start_state = None, None  # the pool held, and the generator's state when it was drawn
        self.examples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def steps_per_pool(self) -> int:
        return self.pool_batches * self.reuse

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training step `step`'s batch: reference latents and target latents (B, 4C, h, w), and instructions."""
        number, position = divmod(step, self.steps_per_pool)
        if number != self.number:
            self.start_state = dict(self.rng.bit_generator.state)
            drawn = [self.draw(self.rng) for _ in range(self.pool_batches)]
            encoded = [encode_latents(self.vae, torch.cat([refs, targets])).chunk(2) for refs, targets, _ in drawn]
            self.examples = (
                torch.cat([references for references, _ in encoded]),  # (N, 4C, h, w)
                torch.cat([latents for _, latents in encoded]),  # (N, 4C, h, w)
                torch.cat([instructions for _, _, instructions in drawn]),  # (N, ...)
            )
            self.number = number
        epoch, index = divmod(position, self.pool_batches)
        size = len(self.examples[0]) // self.pool_batches
        if self.reuse == 1:
            rows = torch.arange(index * size, (index + 1) * size)
        else:
            order = torch.Generator().manual_seed(self.seed * 1_000_003 + number * 1009 + epoch)
            rows = torch.randperm(len(self.examples[0]), generator=order)[index * size : (index + 1) * size]
        return tuple(tensor[rows] for tensor in self.examples)

    def stream_state(self, step: int) -> dict:
        """The data stream's generator state that resumes training at `step`: the state its pool was drawn from."""
        if self.number == step // self.steps_per_pool:
            return self.start_state
        return self.rng.bit_generator.state


def flow_matching_step(
    transformer: Flux2Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    reference_latents: torch.Tensor,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The base editor's flow-matching loss on one batch (to be back-propagated).

    Args:
        transformer: the base editor being trained.
        scheduler: the training scheduler, whose sigmas are drawn (logit-normal).
        reference_latents: (B, 4C, h, w) the encoded references (`encode_latents`), what the editor receives.
        latents: (B, 4C, h, w) the encoded targets, what it must produce.
        prompt_embeds: (B, L, D_txt) the instructions' embeddings.
        generator: draws the sigmas and the noise.
    """
    sigmas = sample_sigmas(scheduler, latents.shape[0], "logit_normal", generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    velocity, _ = predict_velocity(
        transformer, add_noise(latents, noise, sigmas), reference_latents, {"prompt_embeds": prompt_embeds}, sigmas
    )
    return flow_matching_loss(
        velocity, Flux2KleinPipeline._pack_latents(latents), Flux2KleinPipeline._pack_latents(noise)
    )


def resume_flags(args: argparse.Namespace) -> dict:
    """The flags a checkpoint is tied to (--max_steps too when the cosine schedule decays towards it)."""
    flags = {name: getattr(args, name) for name in RESUME_FLAGS}
    if args.lr_scheduler == "cosine":
        flags["max_steps"] = args.max_steps
    return flags


def save_checkpoint(
    folder: Path,
    trained: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_state: dict,
    step: int,
    flags: dict,
) -> None:
    """Writes what training needs to go on exactly from `step` into `folder`, whole or not at all.

    Args:
        folder: the checkpoint folder (its previous checkpoint is replaced only once the new one is complete).
        trained: every trained module (the transformer and the instructions).
        optimizer: its AdamW state.
        lr_scheduler: its schedule's position.
        rng_state: the data stream's generator state to resume from (`ExamplePool.stream_state`; the noise
            generators are seeded by step).
        step: steps done.
        flags: `resume_flags` of the run.
    """
    with atomic_folder(folder, owned=(CHECKPOINT_WEIGHTS_NAME, CHECKPOINT_STATE_NAME)) as staging:
        weights = {name: tensor.detach().contiguous() for name, tensor in trained.state_dict().items()}
        safetensors.torch.save_file(weights, staging / CHECKPOINT_WEIGHTS_NAME)
        state = {
            "step": step,
            "flags": flags,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng_state,
            "torch_rng": torch.get_rng_state(),  # torch's global generator, for whatever draws from it
        }
        torch.save(state, staging / CHECKPOINT_STATE_NAME)


def load_checkpoint(
    folder: Path,
    trained: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    flags: dict,
) -> int:
    """Restores a `save_checkpoint` folder into the run's objects; returns the steps it had done (0 when `folder`
    holds no checkpoint). Refuses, before changing anything, a checkpoint written with other flags."""
    if not (folder / CHECKPOINT_STATE_NAME).is_file():
        return 0
    state = torch.load(folder / CHECKPOINT_STATE_NAME, weights_only=True)
    if state["flags"] != flags:
        differing = sorted(name for name in flags if state["flags"].get(name) != flags[name])
        raise SystemExit(
            f"error: the checkpoint in {folder} was trained with other {', '.join('--' + n for n in differing)} "
            f"({', '.join(str(state['flags'].get(n)) for n in differing)}): pass the same flags to resume it, or "
            "another --checkpoint_dir to start afresh."
        )
    trained.load_state_dict(safetensors.torch.load_file(folder / CHECKPOINT_WEIGHTS_NAME))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def main(args: argparse.Namespace) -> Flux2KleinPipeline:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = AutoencoderKLFlux2.from_pretrained(args.vae_dir).eval().requires_grad_(False)
    if args.init_transformer:
        transformer = Flux2Transformer2DModel.from_pretrained(args.init_transformer).train()
    else:
        transformer = build_transformer(
            vae.config.latent_channels, args.num_layers, args.num_single_layers, args.num_attention_heads
        ).train()
    families = args.world in ("families", "space")  # instructions read by a learned text-encoder stand-in
    if families:  # toy world 2's structured instructions, or world 3's parameter vectors
        width = edit_space.INSTRUCTION_WIDTH if args.world == "space" else INSTRUCTION_WIDTH
        encoder = InstructionEncoder(instruction_width=width, prompt_tokens=PROMPT_TOKENS, prompt_dim=PROMPT_DIM)
        encoder.train()
    else:  # row 0: the empty prompt; row 1 + i: the instruction of the i-th edit of EDITS
        prompts = torch.nn.Parameter(torch.randn(1 + len(EDITS), PROMPT_TOKENS, PROMPT_DIM) * 0.02)  # (1+E, L, D)
    # Everything trained, under the names its checkpoint holds.
    trained = torch.nn.ModuleDict({"transformer": transformer})
    trained["instructions"] = encoder if families else torch.nn.ParameterList([prompts])
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.learning_rate)
    if args.lr_scheduler == "cosine" and args.max_steps is None:
        raise SystemExit("error: --lr_scheduler cosine decays to zero at --max_steps; give it.")
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_steps
    )
    scheduler = klein_scheduler()
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    flags = resume_flags(args)
    step = load_checkpoint(checkpoint_dir, trained, optimizer, lr_scheduler, rng, flags) if checkpoint_dir else 0
    saved_step = step
    batch_source = {"edits": instruction_batch, "families": world_batch, "space": space_batch}[args.world]
    pool = ExamplePool(
        lambda generator: batch_source(
            generator,
            args.batch_size,
            edited_fraction=args.edited_fraction,
            instruction_fraction=args.instruction_fraction,
            **({"families": tuple(args.families)} if args.families else {}),
        ),
        vae,
        rng,
        args.pool_batches,
        args.reuse,
        args.seed,
    )
    deadline = time.monotonic() + args.minutes * 60
    progress = tqdm(desc="base editor", unit="step", mininterval=2, initial=step, total=args.max_steps)
    while time.monotonic() < deadline and (args.max_steps is None or step < args.max_steps):
        reference_latents, latents, instructions = pool.batch(step)
        # (B, L, D_txt): structured instructions through the encoder, or the learned prompts (-1: the empty one)
        prompt_embeds = encoder(instructions) if families else prompts[instructions + 1]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss = flow_matching_step(transformer, scheduler, reference_latents, latents, prompt_embeds, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        step += 1
        progress.update()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_dir and step % args.checkpointing_steps == 0:
            save_checkpoint(checkpoint_dir, trained, optimizer, lr_scheduler, pool.stream_state(step), step, flags)
            saved_step = step
    progress.close()
    if checkpoint_dir and step != saved_step:  # the time budget ended between two checkpoints
        save_checkpoint(checkpoint_dir, trained, optimizer, lr_scheduler, pool.stream_state(step), step, flags)

    transformer.eval().requires_grad_(False)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer, is_distilled=True
    )
    pipe.set_progress_bar_config(disable=True)
    print(f"base editor: {step} steps")
    output_dir = Path(args.output_dir)
    # Saved as a FluxDeltaEditPipeline, whose text encoder and tokenizer are optional: there are none here. It knows
    # only the world's image size, and says so to a user who brings another.
    if families:
        encoder.eval().requires_grad_(False)
        if args.world == "space":
            report_space(pipe, encoder, count=args.report_queries)
        else:
            report_families(pipe, encoder, seed=args.seed + 10_000, count=args.report_queries, families=args.families)
        FluxDeltaEditPipeline.from_pipe(pipe, image_size=IMAGE_SIZE).save_pretrained(output_dir)
        encoder.save_pretrained(output_dir / "instruction_encoder")
        empty = encoder.empty_prompt_embeds()
        safetensors.torch.save_file({"prompt_embeds": empty.contiguous()}, output_dir / EMPTY_PROMPT_EMBEDS_NAME)
        return pipe
    prompts = prompts.detach()
    report(pipe, prompts, seed=args.seed + 10_000)
    FluxDeltaEditPipeline.from_pipe(pipe, image_size=IMAGE_SIZE).save_pretrained(output_dir)
    safetensors.torch.save_file({"prompt_embeds": prompts[:1].contiguous()}, output_dir / EMPTY_PROMPT_EMBEDS_NAME)
    safetensors.torch.save_file(
        {name: prompts[i : i + 1].contiguous() for i, name in enumerate(EDITS, start=1)},
        output_dir / EDIT_PROMPT_EMBEDS_NAME,
    )
    return pipe


if __name__ == "__main__":
    main(parse_args())
