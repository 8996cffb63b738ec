#!/usr/bin/env python
"""Where the adapter's ceiling is: a ladder of rungs, each trained with the same steps on the same base editor.

On a world-2 build folder (its `base/` and `siglip/`), for the S1 edits of `--families`, every rung is measured per
family on `--queries` held-out queries (each with its own exemplar pair; mean absolute error in [0, 1], gap closed =
(identity - output) / (identity - floor), as in `world2_quality.py`):

    1. told base        the base editor told the edit by its instruction, no adapter: the ceiling of any adapter
    2. oracle           a learned code per edit fed, in place of the semantic delta, through the adapter's own
                        refiner, resampler, projections and decoupled attention: can the injection path make the
                        family at all?
    3-4. delta (k)      the paper's adapter (semantic delta, consistency loss), trained on the first k of
                        `--families` for each k of `--family_counts`: does competition between families explain a
                        shortfall?
    7. source + delta   outside the paper, a measurement only: the exemplar source's layer-normed SigLIP tokens
                        beside the delta, as the adapter's input (what does the delta alone lose?)

Rungs 5 and 6 are flags of the same script: `--num_edit_tokens`, `--resampler_depth` (more edit tokens, a deeper
resampler) and `--image_encoder` (another SigLIP stand-in). `--lora_rank R`, outside the paper and a measurement
only, also trains a LoRA of the base's attention with every adapter rung (removed after it): is a family the oracle
cannot make limited by the frozen base's reading of the injected tokens?

Adapters train as the build trains its own (batch 16, AdamW 1e-3, cosine schedule, logit-normal timesteps,
λ_delta = 1; the oracle without the consistency loss), on `--pairs_per_family` pairs per family encoded once, each
batch drawing families evenly.

    python examples/toyworld/world2_ladder.py --work_dir toy2 --families brightness flip remove --steps 1500
        [--family_counts 1 2 3] [--rungs told oracle delta] [--queries 16] [--markdown] [--state_dir DIR]

With `--state_dir`, a ladder survives a session's end: each rung's measurements are kept as it finishes, and each
adapter's training checkpoints every `--checkpointing_steps` steps and resumes exactly, under a folder named by the
flags that decide the results (another ladder's state is never mixed in). Run the same command again to go on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import SiglipVisionModel

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.backbones.flux2 import encode_latents
from diffusers_delta.losses import loss_weighting, sample_sigmas
from diffusers_delta.semantic_delta import (
    SiglipPreprocessor,
    delta_from_features,
    images_to_siglip_pixels,
    patch_features,
    token_layer_norm,
)
from diffusers_delta.toyworld import IMAGE_SIZE, changed_pair, instruction_vector, render_batch, split_edits
from diffusers_delta.toyworld.families import edits_by_family
from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder
from diffusers_delta.training import DeltaAdapterObjective


sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import train_delta_adapter  # noqa: E402
import world2_quality  # noqa: E402
from world2_quality import gap, ratios_to_told  # noqa: E402


RUNGS = ("told", "oracle", "delta", "source")
TOLD = "1 told base"
TRAIN_SEED_BASE = 20_000_000  # far from the benchmark's query and exemplar seeds


class EncodedPairs:
    """S1 training pairs of some families, encoded once: latents and SigLIP features of sources and targets.

    Args:
        pipe: the base pipeline (its VAE) and `image_encoder`: the SigLIP stand-in.
        families: the families, each with `pairs_per_family` pairs, its edits taken in turn.
        seed: seeds the scenes.
    """

    def __init__(self, pipe, image_encoder: SiglipVisionModel, families: list[str], pairs_per_family: int, seed: int):
        self.edits = split_edits("S1")
        edit_index = {edit.name: index for index, edit in enumerate(self.edits)}
        groups = edits_by_family(self.edits)
        preprocessor = SiglipPreprocessor(image_encoder.config.image_size)
        sources, targets, self.edit_ids, self.family_rows = [], [], [], {}
        for number, family in enumerate(families):
            edits = groups[family]
            rows = []
            for index in range(pairs_per_family):
                edit = edits[index % len(edits)]
                scene, edited = changed_pair(edit, TRAIN_SEED_BASE + seed * 1_000_003 + number * 100_003 + index,
                                             IMAGE_SIZE)  # fmt: skip
                rows.append(len(sources))
                sources.append(scene)
                targets.append(edited)
                self.edit_ids.append(edit_index[edit.name])
            self.family_rows[family] = torch.tensor(rows)
        self.edit_ids = torch.tensor(self.edit_ids)
        encoded = {"source": [], "target": []}
        with torch.no_grad():
            for name, scenes in (("source", sources), ("target", targets)):
                for start in range(0, len(scenes), 64):
                    pixels = render_batch(scenes[start : start + 64])  # (b, 3, H, W) in [-1, 1]
                    features = patch_features(image_encoder, preprocessor(pixels / 2 + 0.5))  # (b, P, D)
                    encoded[name].append((encode_latents(pipe.vae, pixels), features))
        self.source_latents, self.source_features = (torch.cat(parts) for parts in zip(*encoded["source"]))
        self.target_latents, self.target_features = (torch.cat(parts) for parts in zip(*encoded["target"]))

    def batch(self, families: list[str], batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Rows of a batch: a family drawn evenly for each example, then one of its pairs."""
        picks = torch.randint(len(families), (batch_size,), generator=generator)
        return torch.stack([
            self.family_rows[families[int(p)]][torch.randint(len(self.family_rows[families[int(p)]]), (1,),
                                                             generator=generator)[0]]
            for p in picks
        ])  # fmt: skip


def source_and_delta(source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Rung 7's adapter input: the semantic delta and the source's layer-normed tokens, (B, 2P, D) float32."""
    delta = delta_from_features(source_features.float(), target_features.float())  # (B, P, D)
    return torch.cat([delta, token_layer_norm(source_features.float())], dim=1)


def train_adapter(
    pipe, image_encoder, data: EncodedPairs, families: list[str], kind: str, args, state: Path | None = None
):
    """Trains a fresh adapter on `families` with the base frozen, fed the semantic delta (`kind` "delta"), a learned
    code per S1 edit ("oracle") or the delta beside the source's tokens ("source"); returns it and, for the oracle,
    its codes (E, P, D_enc). With a `state` folder, checkpoints there every `args.checkpointing_steps` steps and
    resumes exactly from the last checkpoint (removed once the training is complete)."""
    oracle = kind == "oracle"
    torch.manual_seed(args.seed)
    base_processors = pipe.transformer.attn_processors
    adapter = train_delta_adapter.new_adapter(args, pipe.transformer, image_encoder).train()
    lora = add_lora(pipe.transformer, args.lora_rank) if args.lora_rank else {}  # name -> parameter
    objective = DeltaAdapterObjective(
        adapter, pipe.transformer, pipe.vae, image_encoder, SiglipPreprocessor(image_encoder.config.image_size),
        pipe.empty_prompt_embeds, lambda_delta=0.0 if oracle else args.lambda_delta,
    )  # fmt: skip
    parameters = list(adapter.parameters()) + list(lora.values())
    codes = None
    if oracle:  # one learned code per S1 edit, at the scale of a layer-normed delta
        codes = torch.nn.Parameter(torch.randn(len(data.edits), *data.source_features.shape[1:]))
        parameters.append(codes)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=args.steps)
    training_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # its full grid
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = None if state is None else state / "checkpoint.pt"
    first_step = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        adapter.load_state_dict(saved["adapter"])
        if codes is not None:
            codes.data.copy_(saved["codes"])
        for name, parameter in lora.items():
            parameter.data.copy_(saved["lora"][name])
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        generator.set_state(saved["generator"])
        first_step = saved["step"]
    bar = tqdm(range(first_step, args.steps), desc=f"{kind} adapter", unit="step", mininterval=10,
               initial=first_step, total=args.steps)  # fmt: skip
    for step in bar:
        rows = data.batch(families, args.batch_size, generator)
        sigmas = sample_sigmas(training_scheduler, len(rows), "logit_normal", generator=generator)
        noise = torch.randn(data.target_latents[rows].shape, generator=generator)
        losses = objective(
            data.source_latents[rows], data.target_latents[rows], data.source_features[rows],
            data.target_features[rows], noise, sigmas, loss_weights=loss_weighting("logit_normal", sigmas),
            delta={"oracle": lambda: codes[data.edit_ids[rows]], "delta": lambda: None,
                   "source": lambda: source_and_delta(data.source_features[rows], data.target_features[rows])}[kind](),
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        done = step + 1
        if checkpoint is not None and done < args.steps and done % args.checkpointing_steps == 0:
            save_checkpoint(checkpoint, {
                "step": done, "adapter": adapter.state_dict(), "codes": None if codes is None else codes.detach(),
                "lora": {name: parameter.detach() for name, parameter in lora.items()},
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "generator": generator.get_state(),
            })  # fmt: skip
    pipe.transformer.set_attn_processor(base_processors)  # the base's own again, for the pipeline to load into
    return adapter.eval().requires_grad_(False), None if codes is None else codes.detach()


LORA_NAME = "ladder_lora"


def add_lora(transformer, rank: int) -> dict[str, torch.nn.Parameter]:
    """A fresh LoRA (`LORA_NAME`, rank `rank`, on the attention layers the training script's `--lora_rank` targets;
    its B zero, so the base is unchanged at first), and its parameters by name, trainable."""
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                   target_modules=train_delta_adapter.LORA_TARGETS),
        adapter_name=LORA_NAME,
    )  # fmt: skip
    lora = {name: parameter for name, parameter in transformer.named_parameters() if f".{LORA_NAME}." in name}
    for parameter in lora.values():
        parameter.requires_grad_(True)
    return lora


def write_atomically(path: Path, write) -> None:
    """Writes a file whole or not at all: `write(partial)` fills a file beside `path`, then a rename replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write(partial)
    os.replace(partial, path)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Writes a rung's training state atomically."""
    write_atomically(path, lambda partial: torch.save(checkpoint, partial))


#: Flags that do not change a rung's measurements (they choose which rungs run, or how they are shown).
NOT_IN_STATE_KEY = ("rungs", "family_counts", "markdown", "state_dir", "checkpointing_steps")
#: Flags added after ladders had kept state: in the key only when set.
ADDED_LATER = ("lora_rank",)


def state_folder(args) -> Path | None:
    """Where this ladder's state lives: `--state_dir`, under a name fixed by the flags that decide its results."""
    if args.state_dir is None:
        return None
    flags = {name: value for name, value in sorted(vars(args).items()) if name not in NOT_IN_STATE_KEY}
    for name in ADDED_LATER:  # unset, they leave the key as it was before them: a ladder's state stays its own
        if not flags[name]:
            del flags[name]
    key = hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(args.state_dir) / key


def run_with_inputs(pipe, adapter, cases, adapter_input) -> float:
    """Mean error of the cases edited with the edit tokens the adapter makes of `adapter_input(case)` (1, P', D)."""
    errors = []
    for index, case in enumerate(cases):
        with torch.no_grad():
            tokens = adapter(adapter_input(case).to(adapter.dtype))  # (1, N, D_edit)
        output = pipe(case.query, delta_embeds=tokens, generator=torch.Generator().manual_seed(index)).images[0]
        errors.append(world2_quality.mae(output, case.truth))
    return statistics.mean(errors)


@torch.no_grad()
def exemplar_features(pipe, case) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP patch features of a case's first exemplar, as `encode_exemplar` computes them: (1, P, D) each."""
    preprocessor = SiglipPreprocessor.from_feature_extractor(pipe.feature_extractor)
    source, target = case.exemplars[0]
    pixels = torch.cat([images_to_siglip_pixels([image], preprocessor, "exemplar") for image in (source, target)])
    return patch_features(pipe.image_encoder, pixels).chunk(2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A world-2 build folder: base/ and siglip/.")
    parser.add_argument("--families", nargs="+", required=True, help="S1 families, in the order subsets take them.")
    parser.add_argument("--family_counts", type=int, nargs="+", default=None,
                        help="Train the delta rung on the first k families, for each k (default: all).")  # fmt: skip
    parser.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=RUNGS)
    parser.add_argument("--steps", type=int, default=1500, help="Training steps of every adapter rung.")
    parser.add_argument("--pairs_per_family", type=int, default=400)
    parser.add_argument("--queries", type=int, default=16, help="Held-out queries per family.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lambda_delta", type=float, default=1.0)
    parser.add_argument("--num_edit_tokens", type=int, default=16)
    parser.add_argument("--resampler_dim", type=int, default=128)
    parser.add_argument("--resampler_depth", type=int, default=2)
    parser.add_argument("--resampler_heads", type=int, default=4)
    parser.add_argument("--image_encoder", default=None, help="A SigLIP folder (default: the build's siglip/).")
    parser.add_argument(
        "--lora_rank", type=int, default=0, help="Outside the paper: a LoRA of this rank on the base with each rung."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="Also print the table as markdown (docs/toyworld.md).")
    parser.add_argument("--state_dir", default=None,
                        help="Keep each rung's results and checkpoints here, so that a rerun goes on.")  # fmt: skip
    parser.add_argument("--checkpointing_steps", type=int, default=250,
                        help="With --state_dir: adapter training steps between two checkpoints.")  # fmt: skip
    args = parser.parse_args(argv)
    groups = edits_by_family(split_edits("S1"))
    unknown = [family for family in args.families if family not in groups]
    if unknown:
        parser.error(f"not S1 families: {unknown}; they are {sorted(groups)}.")
    counts = sorted(set(args.family_counts or [len(args.families)]))
    if counts[0] < 1 or counts[-1] > len(args.families):
        parser.error(f"--family_counts must lie between 1 and {len(args.families)}.")

    work = Path(args.work_dir)
    pipe = FluxDeltaEditPipeline.from_pretrained(work / "base")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    image_encoder = (
        SiglipVisionModel.from_pretrained(args.image_encoder or work / "siglip").eval().requires_grad_(False)
    )
    cases = {f: c for f, c in world2_quality.cases_of("S1", args.queries).items() if f in args.families}
    table = {family: {"identity": statistics.mean(world2_quality.mae(c.query, c.truth) for c in cases[family]),
                      "floor": world2_quality.floor_error(pipe, cases[family])}
             for family in args.families}  # fmt: skip
    state = state_folder(args)
    finished = {}  # rung -> {family: error}, as kept by an earlier run of the same ladder
    if state is not None and (state / "results.json").is_file():
        finished = json.loads((state / "results.json").read_text())
        print(f"going on from {state}: {', '.join(finished)} already measured")

    def keep(rung: str, errors: dict) -> None:
        for family, error in errors.items():
            table[family][rung] = error
        finished[rung] = errors
        if state is not None:
            text = json.dumps(finished, indent=1)
            write_atomically(state / "results.json", lambda partial: partial.write_text(text))

    if "told" in args.rungs:
        if TOLD in finished:
            keep(TOLD, finished[TOLD])
        else:
            encoder = InstructionEncoder.from_pretrained(work / "base" / "instruction_encoder").eval()
            told = {}
            for family in args.families:
                prompts = [encoder(torch.from_numpy(instruction_vector(c.edit))[None]) for c in cases[family]]
                told[family] = told_run(pipe, cases[family], prompts)
            keep(TOLD, told)
    # (name, families, adapter input): the paper's rung on every family first, then what explains it
    delta_rungs = [(f"3 delta ({k} famil{'y' if k == 1 else 'ies'})", args.families[:k], "delta")
                   for k in sorted(counts, reverse=True)] if "delta" in args.rungs else []  # fmt: skip
    trainings = delta_rungs[:1] + ([("2 oracle", args.families, "oracle")] if "oracle" in args.rungs else [])
    trainings += delta_rungs[1:] + ([("7 source + delta", args.families, "source")] if "source" in args.rungs else [])
    if args.lora_rank:  # every adapter rung with its LoRA, and named so
        trainings = [(f"{name} + LoRA r{args.lora_rank}", families, kind) for name, families, kind in trainings]
    for name, _, _ in trainings:
        if name in finished:
            keep(name, finished[name])
    trainings = [training for training in trainings if training[0] not in finished]
    if trainings:  # the told rung alone trains nothing: no pairs to encode
        data = EncodedPairs(pipe, image_encoder, args.families, args.pairs_per_family, args.seed)
        edit_index = {edit.name: index for index, edit in enumerate(data.edits)}
    with tempfile.TemporaryDirectory() as scratch:
        for name, families, kind in trainings:
            start = time.perf_counter()
            slug = name.replace(" ", "_")
            rung_state = None if state is None else state / slug
            adapter, codes = train_adapter(pipe, image_encoder, data, families, kind, args, rung_state)
            folder = Path(scratch) / slug
            adapter.save_pretrained(folder)
            pipe.load_delta_adapter(folder, image_encoder_folder=str(args.image_encoder or work / "siglip"))
            inputs = {
                "oracle": lambda case: codes[edit_index[case.edit.name]][None],
                "source": lambda case: source_and_delta(*exemplar_features(pipe, case)),
            }
            errors = {}
            for family in families:
                if kind == "delta":  # through the pipeline's own exemplar encoding
                    errors[family], _ = world2_quality.run(pipe, cases[family])
                else:
                    errors[family] = run_with_inputs(pipe, pipe.delta_adapter, cases[family], inputs[kind])
            pipe.unload_delta_adapter()
            if args.lora_rank:
                pipe.transformer.delete_adapters(LORA_NAME)  # the next rung starts from the frozen base again
            keep(name, errors)
            if rung_state is not None:
                shutil.rmtree(rung_state, ignore_errors=True)  # measured: its checkpoint is spent
            print(f"{name}: trained {args.steps} steps in {time.perf_counter() - start:.0f} s, " + ", ".join(
                f"{family} {gap(table[family], name):+.2f}" for family in families), flush=True)  # fmt: skip
    print_table(table, args.markdown)
    return table


def told_run(pipe, cases, prompts) -> float:
    """Mean error of the base told each case's edit: the upstream klein pipeline on the same weights, no adapter."""
    base = Flux2KleinPipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None, transformer=pipe.transformer,
        is_distilled=True,
    )  # fmt: skip
    base.set_progress_bar_config(disable=True)
    errors = []
    for index, case in enumerate(cases):
        output = base(image=case.query, prompt_embeds=prompts[index], num_inference_steps=4, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(index))  # fmt: skip
        errors.append(world2_quality.mae(output.images[0], case.truth))
    return statistics.mean(errors)


def print_table(table: dict, markdown: bool) -> None:
    """Gap closed per family and rung, and the mean over the families each rung measured."""
    columns = []
    for row in table.values():
        columns += [c for c in row if c not in ("identity", "floor", *columns)]
    lines = [
        "| family | identity | floor | " + " | ".join(columns) + " |",
        "| --- | --- | --- |" + " --- |" * len(columns),
    ]

    def cell(row, column):
        return "" if column not in row else "n/a" if math.isnan(gap(row, column)) else f"{gap(row, column):+.2f}"

    for family, row in table.items():
        cells = [cell(row, c) for c in columns]
        lines.append(f"| {family} | {row['identity']:.4f} | {row['floor']:.4f} | " + " | ".join(cells) + " |")
    means = []
    for column in columns:
        gaps = [gap(row, column) for row in table.values() if column in row and not math.isnan(gap(row, column))]
        means.append(f"{statistics.mean(gaps):+.2f}" if gaps else "")
    lines.append("| mean | | | " + " | ".join(means) + " |")
    if TOLD in columns:  # the goals' measure, per rung over the families it trained on
        cells = []
        for column in columns:
            counted, ratios = ratios_to_told([row for row in table.values() if column in row], TOLD)
            cells.append(f"{ratios[column]:.2f} ({counted})" if counted else "")
        lines.append("| ratio to the told base (families it closes by 0.3 or more) | | | " + " | ".join(cells) + " |")
    print("\ngap closed per family and rung (S1 edits):")
    print("\n".join(lines) if markdown else "\n".join(line.replace("|", " ") for line in lines[:1] + lines[2:]))


if __name__ == "__main__":
    main()
