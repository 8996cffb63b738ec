#!/usr/bin/env python
"""Train a Delta-Adapter on FLUX.2 [klein], FLUX.1 Kontext [dev] or FLUX.3 from single exemplar pairs.

Each (source, target) pair supervises itself: the source is the query, the semantic delta of the pair conditions the
frozen transformer through the adapter, and the target is reconstructed with flow matching, plus the semantic-delta
consistency loss (Delta-Adapter, sections 4.1 and 4.4). Only adapter weights train (and, with --lora_rank, a LoRA on
the transformer). Runs under accelerate on one or many GPUs (or CPU processes):

    accelerate launch examples/train_delta_adapter.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-4B \
        --train_data_dir pairs/ --output_dir delta-adapter --max_train_steps 10000

The base's backbone is read from its `model_index.json` (`Flux2KleinPipeline`: FLUX.2; `FluxKontextPipeline`: FLUX.1
Kontext, trained under Kontext's default distilled guidance, 3.5), or, for FLUX.3, which has only modular pipelines,
its `modular_model_index.json` (`Flux3ModularPipeline`, `Flux3DistilledModularPipeline`: its components load through
the Delta-Adapter's modular pipeline).

See docs/training.md for data layouts, multi-GPU runs, resuming and publishing.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, free_memory
from diffusers.utils import load_image
from huggingface_hub import create_repo
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, SiglipImageProcessorPil, SiglipVisionModel

from diffusers_delta import DeltaAdapterModel
from diffusers_delta.adapter_files import default_feature_extractor, read_empty_prompt_embeds, write_adapter_folder
from diffusers_delta.atomic_folder import atomic_folder
from diffusers_delta.backbones import adapter_for, backbone_of, backbone_of_pipeline, pipeline_class_name
from diffusers_delta.data import (
    HubPairDataset,
    LocalPairDataset,
    MixedPairs,
    MixedStream,
    NHREditDataset,
    PairTransform,
    PicoBananaDataset,
    SideBySideDataset,
    StreamingHubPairDataset,
    TransformedPairs,
    TransformedStream,
    collate_pairs,
    relation_split,
)
from diffusers_delta.editing import edited_images
from diffusers_delta.grids import make_edit_grid
from diffusers_delta.hub import EXAMPLE_FILES, push_folder, render_model_card
from diffusers_delta.losses import loss_weighting, sample_sigmas
from diffusers_delta.pipelines import DELTA_PIPELINES, delta_pipeline_for
from diffusers_delta.semantic_delta import SiglipPreprocessor, patch_features
from diffusers_delta.training import DeltaAdapterObjective, enable_image_encoder_checkpointing


logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Every attention projection of both block types (the double blocks' `to_out` is a ModuleList: take its Linear;
# FLUX.2's single blocks fuse QKV with the MLP, FLUX.1's project Q, K and V apart).
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out|to_q|to_k|to_v)"
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a Delta-Adapter on FLUX.2 [klein], FLUX.1 Kontext [dev] or FLUX.3 from single pairs."
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The base: a FLUX.2 [klein], FLUX.1 Kontext [dev] or FLUX.3 Hub id or folder (its model_index.json, or "
        "FLUX.3's modular_model_index.json, names it).",
    )
    models.add_argument("--revision", default=None, help="Revision of the base model.")
    models.add_argument("--variant", default=None, help="Weight variant of the base model (e.g. 'bf16').")
    models.add_argument("--image_encoder", default="google/siglip-so400m-patch14-384", help="SigLIP Hub id/folder.")
    models.add_argument("--pretrained_adapter", default=None, help="Start from this adapter folder or Hub id.")
    models.add_argument("--num_edit_tokens", type=int, default=32, help="Edit tokens N of a new adapter.")
    models.add_argument(
        "--edit_token_dim",
        type=int,
        default=None,
        help="Width of a new adapter's edit tokens, which every block's key and value maps read (default: the "
        "transformer's inner width, 3072 on klein-4B and Kontext; smaller widths shrink those maps, most of the "
        "adapter's parameters, in proportion). Recorded in the adapter's config.json.",
    )
    models.add_argument("--resampler_dim", type=int, default=1280, help="Perceiver width of a new adapter.")
    models.add_argument("--resampler_depth", type=int, default=4, help="Perceiver layers of a new adapter.")
    models.add_argument("--resampler_heads", type=int, default=20, help="Perceiver heads of a new adapter.")
    models.add_argument(
        "--projection_type",
        default="perceiver",
        choices=["perceiver", "pooled_mlp"],
        help="Edit-token projection of a new adapter; pooled_mlp is RelationAdapter's, for the ablation.",
    )
    models.add_argument("--lora_rank", type=int, default=0, help="Also train a LoRA of this rank on the transformer.")
    models.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (defaults to the rank).")
    models.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout of the LoRA layers.")
    models.add_argument(
        "--lora_layers",
        default=None,
        help="Comma-separated names of the transformer's modules to train a LoRA on (e.g. 'to_k,to_q,to_v,to_out.0'); "
        "default: every attention projection of both block types.",
    )
    models.add_argument(
        "--freeze_delta_gate",
        action="store_true",
        help="Keep every block's gate λ at 1, as the paper trains (section 5.1). Off by default: λ then learns each "
        "block's own strength, which is how the shipped toy-world model was trained.",
    )
    models.add_argument("--max_sequence_length", type=int, default=512, help="Padded length of the empty prompt.")
    models.add_argument(
        "--empty_prompt_embeds",
        default=None,
        help="A safetensors file with the empty prompt's embeddings ('prompt_embeds', and 'pooled_prompt_embeds' for "
        "Kontext), for bases without a text "
        "encoder (the toy world's); otherwise they are computed with the base's text encoder.",
    )
    models.add_argument(
        "--text_encoder_out_layers",
        type=int,
        nargs="+",
        default=[9, 18, 27],
        help="Qwen3 layers stacked into the prompt embeddings (klein's default; Kontext: unused).",
    )

    data = parser.add_argument_group("data (one source)")
    data.add_argument("--dataset_name", default=None, help="A Hub dataset (or local dataset folder) for `datasets`.")
    data.add_argument(
        "--dataset_config_name", default=None, help="The Hub dataset's configuration, if it has several."
    )
    data.add_argument("--dataset_split", default="train", help="The Hub dataset's split to train on.")
    data.add_argument("--streaming", action="store_true", help="Stream the Hub dataset (needs --max_train_steps).")
    data.add_argument("--source_column", default="source_image", help="Column of source images.")
    data.add_argument("--target_column", default="edited_image", help="Column of target images.")
    data.add_argument("--train_data_dir", default=None, help="Local pairs: source/ + target/, or metadata.jsonl.")
    data.add_argument(
        "--side_by_side_data_dir",
        default=None,
        help="Relation252K layout: TASK/NAME.jpg, each image source|target side by side.",
    )
    data.add_argument(
        "--hold_out_relation_evaluation",
        action="store_true",
        help="With --side_by_side_data_dir: leave out each task's evaluation exemplar and queries, by the seeded rule "
        "of diffusers_delta.data.relation_split that benchmarks/evaluate.py --relation_dir evaluates them with.",
    )
    data.add_argument(
        "--max_train_pairs",
        type=int,
        default=None,
        help="With --hold_out_relation_evaluation: train on this many pairs, the first by the split's seeded order "
        "(the paper's seen-task setting: 16000).",
    )
    data.add_argument("--split_seed", type=int, default=0, help="The seed of the Relation evaluation split.")
    data.add_argument(
        "--data_mix",
        nargs="+",
        default=None,
        metavar="KIND:PATH[:WEIGHT]",
        help="Several sources mixed by weight (default 1), each 'folder:DIR' (as --train_data_dir), "
        "'side_by_side:DIR' (as --side_by_side_data_dir, with the Relation split flags), 'hub:NAME' (as "
        "--dataset_name, with --dataset_split and the column flags), 'pico_banana:SFT.jsonl' (Pico-Banana-400K's "
        "single-turn manifest, its images beside it as diffusers_delta.data.PicoBananaDataset reads them) or "
        "'nhr_edit:DIR' (NHR-Edit as published: DIR/train/metadata.jsonl and its images/), e.g. "
        "--data_mix side_by_side:Relation252K/:2 folder:my-pairs/:1. The mix is drawn from --seed. With "
        "--streaming: hub: sources only (the same columns in each), drawn by weight pair by pair.",
    )
    data.add_argument("--cache_dir", default=None, help="Hub cache for models and datasets.")
    data.add_argument("--resolution", type=int, default=512, help="Square training resolution.")
    data.add_argument(
        "--allow_paths_outside_dataset",
        action="store_true",
        help="Read the image paths a manifest (metadata.jsonl, sft.jsonl) gives even where they leave the dataset's "
        "folder (absolute paths, '..', links out of it); by default such pairs are skipped and counted.",
    )
    data.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop pairs to the square at their centre; by default at a random place (the same for both images of a "
        "pair, a function of the seed, epoch and pair, so resuming is exact), as diffusers' scripts do. With "
        "--cache_latents the first epoch's crops are kept.",
    )
    data.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every pair's latents and SigLIP features once before training.",
    )
    data.add_argument(
        "--cache_latents_dir",
        default=None,
        help="With --cache_latents: keep the encoded pairs in this folder and read them from it on later runs (a "
        "resume) instead of encoding again. It records what they were encoded from (data, resolution, models, "
        "precision) and is encoded anew when that differs.",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes loading data (0: the main).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="delta-adapter", help="Where checkpoints and the release go.")
    train.add_argument("--seed", type=int, default=0, help="Seeds the data order, noise and initialisation.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    train.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the data.")
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches per optimizer step (an epoch's last step may take fewer: each pair is used once).",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute the frozen transformer's, VAE decoder's and SigLIP's activations in backward.",
    )
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warm-up).")
    train.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size x devices x accumulation steps.",
    )
    train.add_argument(
        "--optimizer",
        default="adamw",
        type=str.lower,
        choices=["adamw", "prodigy"],
        help="AdamW, or Prodigy (`pip install prodigyopt`; set --learning_rate near 1.0).",
    )
    train.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="AdamW from bitsandbytes in 8 bits (CUDA only; `pip install bitsandbytes`).",
    )
    train.add_argument("--prodigy_beta3", type=float, default=None, help="Prodigy's beta3 (default: sqrt(beta2)).")
    train.add_argument("--prodigy_decouple", action="store_true", help="Prodigy: decoupled weight decay.")
    train.add_argument("--prodigy_use_bias_correction", action="store_true", help="Prodigy: Adam's bias correction.")
    train.add_argument("--prodigy_safeguard_warmup", action="store_true", help="Prodigy: remove lr from D's estimate.")
    train.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule, as diffusers' get_scheduler names them.",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of linear warm-up.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's (and Prodigy's) beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's (and Prodigy's) beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config; frozen models are cast to it.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="TF32 matrix products on Ampere GPUs (faster).")
    train.add_argument("--lambda_delta", type=float, default=1.0, help="Weight of the consistency loss (0: off).")
    train.add_argument(
        "--weighting_scheme",
        default="none",
        choices=["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"],
        help="How noise levels are drawn or weighted, as in diffusers' FLUX scripts (default: uniform, as there; "
        "test-time adaptation and the toy-world build use logit_normal).",
    )
    train.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    train.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density.")
    train.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")

    saving = parser.add_argument_group("checkpoints, logging, validation, publishing")
    saving.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N.")
    saving.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    saving.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    saving.add_argument("--logging_dir", default="logs", help="Tracker logs, inside --output_dir.")
    saving.add_argument("--report_to", default="tensorboard", help="'tensorboard', 'wandb', 'all' or 'none'.")
    saving.add_argument(
        "--validation_exemplar",
        nargs=3,
        action="append",
        metavar=("SOURCE", "TARGET", "QUERY"),
        help="An exemplar pair and a query to render during training (repeatable).",
    )
    saving.add_argument("--validation_steps", type=int, default=500, help="Render the validation grid every N.")
    saving.add_argument("--validation_inference_steps", type=int, default=4, help="Denoising steps of validation.")
    saving.add_argument(
        "--num_validation_images", type=int, default=1, help="Outputs per validation query (seeds seed, seed+1, ...)."
    )
    saving.add_argument("--push_to_hub", action="store_true", help="Upload the release folder to the Hub.")
    saving.add_argument("--hub_model_id", default=None, help="Repo to push to (defaults to the output folder name).")
    saving.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one; not with wandb).")
    saving.add_argument(
        "--license",
        default=None,
        help="Licence of the trained adapter, for its card (default: the base model's: Apache-2.0 for klein-4B, the "
        "FLUX non-commercial licence for klein-9B, the FLUX.1 [dev] non-commercial licence for Kontext [dev]).",
    )

    args = parser.parse_args(input_args)
    sources = [args.dataset_name, args.train_data_dir, args.side_by_side_data_dir, args.data_mix]
    if sum(source is not None for source in sources) != 1:
        parser.error("Give exactly one of --dataset_name, --train_data_dir, --side_by_side_data_dir, --data_mix.")
    if args.data_mix:
        try:
            args.data_mix_sources = [parse_mix_source(spec) for spec in args.data_mix]
        except ValueError as error:
            parser.error(str(error))
        if args.streaming and any(kind != "hub" for kind, _, _ in args.data_mix_sources):
            parser.error("--streaming mixes Hub datasets only: every --data_mix source must be hub:NAME.")
    splits_relation = args.side_by_side_data_dir or any(
        kind == "side_by_side" for kind, _, _ in getattr(args, "data_mix_sources", [])
    )
    if (args.hold_out_relation_evaluation or args.max_train_pairs is not None) and not splits_relation:
        parser.error("--hold_out_relation_evaluation and --max_train_pairs split a --side_by_side_data_dir.")
    if args.max_train_pairs is not None and not args.hold_out_relation_evaluation:
        parser.error("--max_train_pairs takes its pairs from the held-out split: add --hold_out_relation_evaluation.")
    if args.streaming and (
        (args.dataset_name is None and args.data_mix is None) or args.max_train_steps is None or args.cache_latents
    ):
        parser.error(
            "--streaming needs --dataset_name (or a --data_mix of hub: sources) and --max_train_steps, and cannot "
            "--cache_latents."
        )
    if args.cache_latents_dir is not None and not args.cache_latents:
        parser.error("--cache_latents_dir keeps the pairs --cache_latents encodes: add --cache_latents.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        parser.error(
            "--hub_token with --report_to wandb would log the token with the run's arguments: log in with "
            "`hf auth login` instead."
        )
    if args.use_8bit_adam and args.optimizer != "adamw":
        parser.error("--use_8bit_adam is an AdamW: it does not go with --optimizer prodigy.")
    if args.edit_token_dim is not None and args.edit_token_dim < 1:
        parser.error(f"--edit_token_dim must be at least 1, got {args.edit_token_dim}.")
    for flag in ("max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}: there would be nothing to train.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file: name the folder checkpoints and the release go to.")
    return args


# ----------------------------------------------------------------------------------------------- data


def load_pairs(args, accelerator: Accelerator, transform: PairTransform):
    """The training pairs, transformed to tensors: a map-style dataset, or a stream already split per rank."""
    if args.data_mix:
        weights = [weight for _, _, weight in args.data_mix_sources]
        if args.streaming:
            import datasets

            streams = [
                rank_stream(args, accelerator, datasets.load_dataset(
                    path, args.dataset_config_name, split=args.dataset_split, cache_dir=args.cache_dir, streaming=True
                ))
                for _, path, _ in args.data_mix_sources
            ]  # fmt: skip
            return TransformedStream(MixedStream(streams, weights, seed=args.seed), transform)
        sources = [mix_source(args, kind, path) for kind, path, _ in args.data_mix_sources]
        names = [f"{kind}:{path}" for kind, path, _ in args.data_mix_sources]
        return TransformedPairs(MixedPairs(sources, weights, seed=args.seed, names=names), transform)
    if args.train_data_dir:
        dataset = LocalPairDataset(args.train_data_dir, allow_outside_root=args.allow_paths_outside_dataset)
        return TransformedPairs(dataset, transform)
    if args.side_by_side_data_dir:
        return TransformedPairs(
            SideBySideDataset(args.side_by_side_data_dir, side_by_side_training_files(args)), transform
        )
    import datasets  # only needed for Hub datasets

    dataset = datasets.load_dataset(
        args.dataset_name,
        args.dataset_config_name,
        split=args.dataset_split,
        cache_dir=args.cache_dir,
        streaming=args.streaming,
    )
    if args.streaming:
        return TransformedStream(rank_stream(args, accelerator, dataset), transform)
    return TransformedPairs(HubPairDataset(dataset, args.source_column, args.target_column), transform)


def rank_stream(args, accelerator: Accelerator, dataset) -> StreamingHubPairDataset:
    """A streaming Hub dataset shuffled by the seed, this rank's share of it, as pairs."""
    from datasets.distributed import split_dataset_by_node

    dataset = split_dataset_by_node(
        dataset.shuffle(seed=args.seed), rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    return StreamingHubPairDataset(dataset, args.source_column, args.target_column)


def side_by_side_training_files(args, root: str | None = None) -> list[Path] | None:
    """The Relation pairs of `root` (default --side_by_side_data_dir) to train on: with
    --hold_out_relation_evaluation the split's training pairs (the first --max_train_pairs of them), else all
    (None)."""
    if not args.hold_out_relation_evaluation:
        return None
    root = root or args.side_by_side_data_dir
    return relation_split(root, args.split_seed, train_pairs=args.max_train_pairs).train


MIX_KINDS = ("folder", "side_by_side", "hub", "pico_banana", "nhr_edit")


#: How many skipped pairs the run's summary names.
SKIPPED_EXAMPLES = 5


def skipped_at_load(pairs) -> dict:
    """The pairs the datasets left out before reading (paths outside their root, missing files), summed by why."""
    totals: dict[str, int] = {}
    stack = [pairs]
    while stack:
        dataset = stack.pop()
        for why, count in getattr(dataset, "skipped_at_load", {}).items():
            totals[why] = totals.get(why, 0) + count
        if isinstance(dataset, (TransformedPairs, TransformedStream)):  # the view of one dataset
            stack.append(dataset.pairs)
        elif isinstance(dataset, MixedPairs):
            stack += dataset.sources
    return totals


def parse_mix_source(spec: str) -> tuple[str, str, float]:
    """`KIND:PATH[:WEIGHT]` -> (kind, path, weight); a path may hold colons (the weight is the last part, if a
    number)."""
    kind, _, rest = spec.partition(":")
    if kind not in MIX_KINDS or not rest:
        raise ValueError(f"--data_mix {spec}: expected KIND:PATH[:WEIGHT] with KIND one of {', '.join(MIX_KINDS)}.")
    path, _, weight = rest.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        return kind, rest, 1.0
    if not path or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"--data_mix {spec}: the weight must be a positive finite number after the path.")
    return kind, path, value


def mix_source(args, kind: str, path: str):
    """One source of --data_mix, untransformed."""
    if kind == "folder":
        return LocalPairDataset(path, allow_outside_root=args.allow_paths_outside_dataset)
    if kind == "side_by_side":
        return SideBySideDataset(path, side_by_side_training_files(args, path))
    if kind == "pico_banana":
        return PicoBananaDataset(path, allow_outside_root=args.allow_paths_outside_dataset)
    if kind == "nhr_edit":
        return NHREditDataset(path, allow_outside_root=args.allow_paths_outside_dataset)
    import datasets

    table = datasets.load_dataset(path, args.dataset_config_name, split=args.dataset_split, cache_dir=args.cache_dir)
    return HubPairDataset(table, args.source_column, args.target_column)


def epoch_batches(num_items: int, epoch: int, args, accelerator: Accelerator) -> list[list[int]]:
    """This rank's batches of dataset indices for an epoch: a seeded permutation, sharded, the last part dropped.

    A pure function of (seed, epoch, rank), so a resumed run sees exactly the data the uninterrupted one would.
    """
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    per_rank = num_items // accelerator.num_processes
    shard = order[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    usable = len(shard) // args.train_batch_size * args.train_batch_size
    return [shard[i : i + args.train_batch_size] for i in range(0, usable, args.train_batch_size)]


class EncodedPairs(torch.utils.data.Dataset):
    """Pairs already encoded (latents and SigLIP features), kept on the CPU (`--cache_latents`)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@torch.no_grad()
def encode_batch(batch: dict, backbone, vae, image_encoder, device) -> dict:
    """Pixels -> latents (as the backbone encodes them) and SigLIP features (a cached batch already holds them)."""
    if "source_latents" in batch:
        return {key: value.to(device) for key, value in batch.items() if key not in ("skipped", "skipped_names")}
    pixels = torch.cat([batch["source_pixels"], batch["target_pixels"]]).to(device)  # (2B, 3, R, R)
    latents = backbone.encode_latents(vae, pixels)  # (2B, C', h, w)
    siglip = torch.cat([batch["source_siglip"], batch["target_siglip"]]).to(device, image_encoder.dtype)
    features = patch_features(image_encoder, siglip)  # (2B, P, D)
    source_latents, target_latents = latents.chunk(2)
    source_features, target_features = features.chunk(2)
    return {
        "source_latents": source_latents,
        "target_latents": target_latents,
        "source_features": source_features,
        "target_features": target_features,
    }


ENCODED_PAIRS_NAME = "encoded_pairs.safetensors"
ENCODED_PAIRS_INDEX = "encoded_pairs.json"


def encoding_fingerprint(args, num_pairs: int, weight_dtype: torch.dtype) -> dict:
    """What encoded pairs are a function of: the data and resolution flags, the models (a local folder's weight files
    by size and modification time), the precision and the number of pairs."""
    flags = run_flags(args, num_processes=1)
    names = (
        "pretrained_model_name_or_path", "revision", "variant", "image_encoder", "dataset_name", "dataset_split",
        "source_column", "target_column", "train_data_dir", "side_by_side_data_dir", "hold_out_relation_evaluation",
        "max_train_pairs", "split_seed", "data_mix", "allow_paths_outside_dataset", "resolution", "seed",
    )  # fmt: skip
    weights = {}
    for name in ("pretrained_model_name_or_path", "image_encoder"):
        folder = Path(flags[name])
        if folder.is_dir():
            for file in sorted(folder.rglob("*.safetensors")):
                stat = file.stat()
                weights[f"{name}/{file.relative_to(folder).as_posix()}"] = [stat.st_size, stat.st_mtime_ns]
    return {
        "flags": {name: flags[name] for name in names},
        "center_crop": args.center_crop,
        "weight_dtype": str(weight_dtype),
        "weights": weights,
        "pairs": num_pairs,
    }


def read_encoded_pairs(folder: str, fingerprint: dict) -> EncodedPairs | None:
    """The pairs `save_encoded_pairs` kept in `folder`, or None where there are none, they cannot be read, or they
    were encoded from anything else than `fingerprint` says."""
    folder = Path(folder)
    try:
        index = json.loads((folder / ENCODED_PAIRS_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    try:
        tensors = load_file(folder / ENCODED_PAIRS_NAME)
    except (OSError, SafetensorError):  # gone or damaged since it was written: encoded anew
        return None
    skipped, names = tensors.pop("skipped").tolist(), index["skipped_names"]
    return EncodedPairs([
        {**{key: value[i] for key, value in tensors.items()}, "skipped": skipped[i], "skipped_names": names[i]}
        for i in range(len(skipped))
    ])  # fmt: skip


def save_encoded_pairs(folder: str, pairs: EncodedPairs, fingerprint: dict) -> None:
    """Writes the encoded pairs to `folder` at once (a failed write leaves it as it was)."""
    keys = [key for key in pairs.items[0] if key not in ("skipped", "skipped_names")]
    tensors = {key: torch.stack([item[key] for item in pairs.items]).contiguous() for key in keys}
    tensors["skipped"] = torch.tensor([item["skipped"] for item in pairs.items])
    index = {"fingerprint": fingerprint, "skipped_names": [item["skipped_names"] for item in pairs.items]}
    with atomic_folder(folder, owned={ENCODED_PAIRS_NAME, ENCODED_PAIRS_INDEX}) as staging:
        save_file(tensors, staging / ENCODED_PAIRS_NAME)
        (staging / ENCODED_PAIRS_INDEX).write_text(json.dumps(index), encoding="utf-8")


def cache_encoded_pairs(pairs, backbone, vae, image_encoder, accelerator: Accelerator) -> EncodedPairs:
    """Encodes every pair once (each rank encodes all of them: ranks then read any index)."""
    items = []
    for index in tqdm(range(len(pairs)), desc="Caching latents", disable=not accelerator.is_local_main_process):
        item = pairs[index]
        encoded = encode_batch(collate_pairs([item]), backbone, vae, image_encoder, accelerator.device)
        counts = {"skipped": item["skipped"], "skipped_names": item["skipped_names"]}
        items.append({**{key: value[0].cpu() for key, value in encoded.items()}, **counts})
    return EncodedPairs(items)


def step_generator(args, step: int, micro_step: int, accelerator: Accelerator) -> torch.Generator:
    """The noise and σ of a micro-step depend only on (seed, step, micro-step, rank): resumes are exact."""
    key = f"{args.seed}/{step}/{micro_step}/{accelerator.process_index}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def empty_prompt_embeds(
    args, backbone, pipeline_class, transformer, base, hub, device, weight_dtype, scheduler
) -> dict:
    """The empty prompt's embeddings by name: from --empty_prompt_embeds, or computed once with the base's text
    encoders (which are then dropped: the adapter folder carries the result, so its users never load them)."""
    if args.empty_prompt_embeds:
        return read_empty_prompt_embeds(
            args.empty_prompt_embeds,
            transformer.config.joint_attention_dim,
            transformer.config.get("pooled_projection_dim"),
        )
    if backbone.PIPELINE_CLASS is None:  # modular only (FLUX.3): its text components load through its index
        text_pipe = pipeline_class.from_pretrained(base, text_free=False, **hub)
        text_pipe.load_components(names=list(backbone.TEXT_COMPONENTS), variant=args.variant)
        text_pipe.text_encoder.to(device, weight_dtype)
    else:
        encoders = {
            name: model_class.from_pretrained(base, subfolder=name, variant=args.variant, **hub).to(
                device, weight_dtype
            )
            for name, model_class in backbone.TEXT_ENCODERS.items()
        }
        tokenizers = {
            name: AutoTokenizer.from_pretrained(base, subfolder=name, **hub)
            for name in backbone.TEXT_COMPONENTS
            if name not in encoders
        }
        text_pipe = backbone.PIPELINE_CLASS(scheduler=scheduler, vae=None, transformer=None, **encoders, **tokenizers)
    embeds = backbone.encode_prompt(text_pipe, "", args.max_sequence_length, tuple(args.text_encoder_out_layers))
    embeds = {name: tensor.to("cpu") for name, tensor in embeds.items()}
    del text_pipe
    free_memory()  # the text encoders leave the GPU before the transformer arrives
    return embeds


def base_backbone(base: str, hub: dict):
    """The backbone module of a base pipeline folder or repo, from its `model_index.json` (or FLUX.3's
    `modular_model_index.json`)."""
    try:
        class_name = pipeline_class_name(base, **hub)
    except (OSError, KeyError) as error:
        raise ValueError(
            f"--pretrained_model_name_or_path {base} is not a diffusers pipeline with a model_index.json or a "
            f"modular_model_index.json ({error}). Pass a FLUX.2 [klein], FLUX.1 Kontext [dev] or FLUX.3 pipeline "
            "folder or Hub id."
        ) from None
    return backbone_of_pipeline(class_name)


def load_base(args, backbone, pipeline_class, base: str, hub: dict) -> tuple:
    """The base's scheduler, VAE and transformer: from its subfolders, as a classic pipeline lays them out, or, for a
    backbone with only modular pipelines (FLUX.3), through its Delta-Adapter modular pipeline's `load_components`
    (its index may point at other repos; its scheduler is made from the blocks' config)."""
    if backbone.PIPELINE_CLASS is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **hub)
        vae = backbone.VAE_CLASS.from_pretrained(base, subfolder="vae", variant=args.variant, **hub)
        transformer = backbone.TRANSFORMER_CLASS.from_pretrained(
            base, subfolder="transformer", variant=args.variant, **hub
        )
        return scheduler, vae, transformer
    pipe = pipeline_class.from_pretrained(base, **hub)
    pipe.load_components(names=["transformer", "vae"], variant=args.variant)
    return pipe.scheduler, pipe.vae, pipe.transformer


def make_optimizer(args, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW), or Prodigy, as diffusers' scripts offer them; the optional packages are
    imported only when asked for."""
    if args.use_8bit_adam:
        if not torch.cuda.is_available():
            raise ValueError("--use_8bit_adam needs a CUDA GPU: bitsandbytes' 8-bit AdamW runs on CUDA only.")
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bitsandbytes.optim.AdamW8bit
    elif args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        if args.learning_rate <= 0.1:
            logger.warning(f"Prodigy usually wants --learning_rate near 1.0, got {args.learning_rate}.")
        return prodigyopt.Prodigy(
            parameters,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_steps(output_dir: str) -> list[int]:
    """Completed checkpoints in `output_dir`, oldest first (half-written `.tmp` folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if m)


def save_checkpoint(accelerator: Accelerator, args, step: int, flags: dict) -> None:
    """Writes `checkpoint-STEP` atomically (a temporary folder renamed when complete), then prunes old ones.

    A run killed while saving leaves only a `.tmp` folder behind; the previous checkpoint stays whole. A run killed
    while pruning leaves a `.deleting-checkpoint-N` folder, which no resume reads.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    if accelerator.is_main_process and os.path.isdir(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, RUN_FLAGS_NAME), "w") as file:
            json.dump(flags, file, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        if args.checkpoints_total_limit is not None:
            for old in checkpoint_steps(args.output_dir)[: -args.checkpoints_total_limit]:
                # Renamed away first: a run killed while deleting leaves no half-deleted `checkpoint-N` to resume.
                doomed = os.path.join(args.output_dir, f".deleting-checkpoint-{old}")
                os.replace(os.path.join(args.output_dir, f"checkpoint-{old}"), doomed)
                shutil.rmtree(doomed)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


#: The flags that define a run: a checkpoint resumed with any other value would not continue the same training
#: (another schedule, optimizer, data order or data). Recorded in every checkpoint as RUN_FLAGS_NAME.
RUN_FLAGS = (
    "pretrained_model_name_or_path", "revision", "variant", "image_encoder", "pretrained_adapter", "num_edit_tokens",
    "edit_token_dim", "resampler_dim", "resampler_depth", "resampler_heads", "projection_type", "lora_rank",
    "lora_alpha", "lora_dropout", "dataset_name", "dataset_split", "source_column", "target_column", "train_data_dir",
    "side_by_side_data_dir", "hold_out_relation_evaluation", "max_train_pairs", "split_seed", "data_mix", "streaming",
    "allow_paths_outside_dataset", "cache_latents", "resolution", "seed", "train_batch_size",
    "gradient_accumulation_steps", "num_train_epochs", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "optimizer", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "lambda_delta", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    "mixed_precision",
)  # fmt: skip
RUN_FLAGS_NAME = "run_flags.json"
#: Run flags added after checkpoints began recording them, with the value every older run had.
LATER_RUN_FLAGS = {
    "hold_out_relation_evaluation": False, "max_train_pairs": None, "split_seed": 0, "data_mix": None,
    "allow_paths_outside_dataset": False, "edit_token_dim": None,
}  # fmt: skip
#: Schedules that do not depend on the run's length: with them a resumed run may train longer.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def run_flags(args, num_processes: int) -> dict:
    """The values of `RUN_FLAGS` (local paths made absolute), the number of processes and, when the learning-rate
    schedule depends on it, the run's length."""
    flags = {}
    for name in RUN_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and name.endswith(("_dir", "_path", "image_encoder", "pretrained_adapter")):
            value = os.path.abspath(value) if os.path.exists(value) else value
        flags[name] = value
    flags["num_processes"] = num_processes
    if args.lr_scheduler not in LENGTH_FREE_SCHEDULES:
        flags["max_train_steps"] = args.max_train_steps
    return flags


def check_resume_flags(resume_path: str, flags: dict) -> None:
    """Refuses to resume a checkpoint written with other run flags, naming each difference (checkpoints written
    before flags were recorded resume with a warning)."""
    recorded_path = os.path.join(resume_path, RUN_FLAGS_NAME)
    if not os.path.isfile(recorded_path):
        logger.warning(f"{resume_path} records no run flags: resuming it as if they were this run's.")
        return
    with open(recorded_path) as file:
        recorded = json.load(file)
    recorded = {**LATER_RUN_FLAGS, **recorded}
    differing = [name for name in flags if recorded.get(name) != flags[name]]
    if differing:
        changes = "; ".join(f"--{name} {recorded.get(name)!r} -> {flags[name]!r}" for name in differing)
        raise SystemExit(
            f"error: {resume_path} was trained with other flags ({changes}), and resuming it with these would not "
            "continue the same run (schedule, optimizer state, data order). Resume with the same flags, or start a "
            "new run from its weights with --pretrained_adapter and another --output_dir."
        )


def resolve_resume(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    steps = checkpoint_steps(args.output_dir)
    return os.path.join(args.output_dir, f"checkpoint-{steps[-1]}") if steps else None


# ----------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def render_validation(args, accelerator, objective, pipeline_class, scheduler, feature_extractor, empty_prompt, step):
    """Edits each validation query by its exemplar with `pipeline_class` around the models in training, and returns
    the grid (exemplar src → tgt | query | output)."""
    model = accelerator.unwrap_model(objective)
    backbone = backbone_of(model.transformer)
    components = {
        "scheduler": scheduler, "vae": model.vae, "transformer": model.transformer,
        "image_encoder": model.image_encoder, "feature_extractor": feature_extractor, "delta_adapter": model.adapter,
    }  # fmt: skip
    if backbone.PIPELINE_CLASS is None:  # modular only (FLUX.3)
        pipe = pipeline_class()
        pipe.update_components(**components)
        call = {}
    else:
        pipe = pipeline_class(**components, **dict.fromkeys(backbone.TEXT_COMPONENTS))
        call = {"max_sequence_length": args.max_sequence_length}
    if backbone.NAME == "flux1":  # Kontext would give the query its preferred resolution (about 1024²)
        call.update(max_area=args.resolution**2, _auto_resize=False)  # validate at the training resolution
    pipe._restore_empty_prompt(empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for source, target, query in args.validation_exemplar:
        source, target, query = load_image(source), load_image(target), load_image(query)
        generators = [
            torch.Generator(accelerator.device).manual_seed(args.seed + i) for i in range(args.num_validation_images)
        ]
        with accelerator.autocast():
            edited = edited_images(
                pipe,
                query.resize((args.resolution, args.resolution)),
                exemplar=(source, target),
                generator=generators,
                num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.validation_inference_steps,
                **call,
            )
        rows.append([source, target, query, *edited])
    outputs = ["output"] if args.num_validation_images == 1 else [f"output {i + 1}" for i in range(len(edited))]
    grid = make_edit_grid(rows, ["exemplar source", "exemplar target", "query", *outputs])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid)}, step=step)
    return grid


# ----------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:  # as diffusers' scripts: one rank speaks, the others only on errors
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    lock = hold_output_dir(accelerator, args.output_dir)
    try:
        if args.push_to_hub and accelerator.is_main_process:  # a bad token or name fails now, not after training
            args.hub_model_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id
        train(args, accelerator)
    finally:
        if lock is not None:  # removed while still held (no later run can take a stale one), then released
            Path(lock.name).unlink(missing_ok=True)
            lock.close()


def new_adapter(args, transformer, image_encoder) -> DeltaAdapterModel:
    """A freshly initialised adapter for `transformer` and `image_encoder`, sized by the script's adapter flags
    (`--num_edit_tokens`, `--edit_token_dim`, `--resampler_*`, `--projection_type`)."""
    width = {} if getattr(args, "edit_token_dim", None) is None else {"edit_token_dim": args.edit_token_dim}
    return adapter_for(
        transformer,
        image_encoder.config.hidden_size,
        **width,
        num_edit_tokens=args.num_edit_tokens,
        resampler_dim=args.resampler_dim,
        resampler_depth=args.resampler_depth,
        resampler_heads=args.resampler_heads,
        resampler_head_dim=args.resampler_dim // args.resampler_heads,
        projection_type=getattr(args, "projection_type", "perceiver"),
    )


def hold_output_dir(accelerator: Accelerator, output_dir: str):
    """Locks `output_dir` for this run (the main process holds an exclusive lock on `.training.lock` until it ends;
    the kernel releases it if the process dies). A second job on the same folder, for instance one started while the
    workers of a hard-killed launcher still train, is refused on every rank before it writes anything."""
    lock = None
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(os.path.join(output_dir, ".training.lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            lock = None
    free = torch.tensor(
        [1.0 if lock is not None or not accelerator.is_main_process else 0.0], device=accelerator.device
    )
    if accelerator.gather(free).min().item() == 0.0:
        raise RuntimeError(
            f"Another training run is writing to {output_dir} (it holds {output_dir}/.training.lock). Wait for it or "
            "stop it (its workers may outlive a killed launcher), or pass another --output_dir."
        )
    return lock


def train(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Everything after the set-up: models, data, the loop, checkpoints and the release folder."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # 1. Frozen components, and the empty prompt's embeddings (then the text encoder goes)
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    base = args.pretrained_model_name_or_path
    backbone = base_backbone(base, hub)
    if args.lora_rank and backbone.PIPELINE_CLASS is None:
        raise ValueError(
            f"--lora_rank: a LoRA beside the adapter is trained on FLUX.2 [klein] and FLUX.1 Kontext bases, not yet "
            f"on {backbone.FAMILY} ({base}). Train the adapter alone (leave out --lora_rank)."
        )
    # The Delta-Adapter pipeline that validates (and, for a backbone with only modular pipelines, loads) the base
    pipeline_class = DELTA_PIPELINES.get(backbone.NAME) or delta_pipeline_for(base, **hub)
    scheduler, vae, transformer = load_base(args, backbone, pipeline_class, base, hub)
    image_encoder = SiglipVisionModel.from_pretrained(args.image_encoder, cache_dir=args.cache_dir)
    try:
        feature_extractor = SiglipImageProcessorPil.from_pretrained(args.image_encoder, cache_dir=args.cache_dir)
    except OSError:
        feature_extractor = default_feature_extractor(image_encoder)
    empty_prompt = empty_prompt_embeds(
        args, backbone, pipeline_class, transformer, base, hub, device, weight_dtype, scheduler
    )

    for model in (vae, transformer, image_encoder):
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        if weight_dtype != torch.float32:
            model.to(dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
        enable_image_encoder_checkpointing(image_encoder)  # the consistency loss backpropagates through SigLIP

    # 2. The adapter (float32 master weights) and the optional LoRA
    if args.pretrained_adapter:
        adapter = DeltaAdapterModel.from_pretrained(args.pretrained_adapter, cache_dir=args.cache_dir)
    else:
        adapter = new_adapter(args, transformer, image_encoder)
    adapter.to(device).train()
    if args.lora_rank:
        from peft import LoraConfig

        targets = [name.strip() for name in args.lora_layers.split(",")] if args.lora_layers else LORA_TARGETS
        transformer.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha or args.lora_rank,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=targets,
            )
        )
        cast_training_params(transformer, dtype=torch.float32)  # the LoRA trains in float32 under mixed precision
    if args.freeze_delta_gate:
        for block in [*adapter.double_blocks, *adapter.single_blocks]:
            block.delta_gate.requires_grad_(False)  # λ stays at its value (1 for a new adapter)

    preprocessor = SiglipPreprocessor.from_feature_extractor(feature_extractor)
    objective = DeltaAdapterObjective(  # it adds the backbone's training conditioning (Kontext: the guidance)
        adapter,
        transformer,
        vae,
        image_encoder,
        preprocessor,
        {name: tensor.to(device) for name, tensor in empty_prompt.items()},
        args.lambda_delta,
    )
    if accelerator.num_processes > 1:  # DDP syncs only what trains; the frozen billions are never broadcast
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, objective.frozen_state_names())
    trainable = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, trainable)

    # 3. Checkpoints hold the adapter in its release format (plus LoRA), never the frozen model
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            write_adapter_folder(
                output_dir,
                model.adapter,
                empty_prompt_embeds=empty_prompt,
                **transformer_lora(model.transformer),
            )
        weights.clear()

    def load_model_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        loaded = DeltaAdapterModel.from_pretrained(input_dir)
        model.adapter.load_state_dict(loaded.state_dict())
        if args.lora_rank:
            load_lora(model.transformer, input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 4. Data
    transform = PairTransform(
        args.resolution,
        preprocessor,
        multiple_of=2 * 2 ** (len(vae.config.block_out_channels) - 1),
        center_crop=args.center_crop,
        seed=args.seed,
    )
    pairs = load_pairs(args, accelerator, transform)
    load_skips = skipped_at_load(pairs)
    streaming = isinstance(pairs, torch.utils.data.IterableDataset)
    if args.cache_latents:
        fingerprint = encoding_fingerprint(args, len(pairs), weight_dtype) if args.cache_latents_dir else None
        kept = read_encoded_pairs(args.cache_latents_dir, fingerprint) if fingerprint else None
        if kept is not None:
            logger.info(f"Read {len(kept)} encoded pairs from {args.cache_latents_dir}")
            pairs = kept
        else:
            pairs = cache_encoded_pairs(pairs, backbone, vae, image_encoder, accelerator)
            if fingerprint and accelerator.is_main_process:
                save_encoded_pairs(args.cache_latents_dir, pairs, fingerprint)
    if streaming:
        batches_per_epoch = None
    else:
        batches_per_epoch = len(pairs) // accelerator.num_processes // args.train_batch_size
        if batches_per_epoch == 0:
            raise ValueError(f"{len(pairs)} pairs cannot fill one batch of {args.train_batch_size} per process.")
    if args.max_train_steps is None:  # an epoch's last accumulation group may be short: it still is a step
        args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    position = DataPosition()
    accelerator.register_for_checkpointing(position)
    if accelerator.is_main_process:
        accelerator.init_trackers("delta-adapter", config={k: str(v) for k, v in vars(args).items()})

    # 5. Resume
    global_step = 0
    resume_path = resolve_resume(args)
    flags = run_flags(args, accelerator.num_processes)
    if resume_path:
        check_resume_flags(resume_path, flags)
        accelerator.load_state(resume_path)
        global_step = int(os.path.basename(os.path.normpath(resume_path)).split("-")[1])
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")

    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training {sum(p.numel() for p in trainable):,} parameters for {args.max_train_steps} steps, "
        f"{pairs_per_step} pairs per step."
    )
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # its training σ grid
    summary = {"skipped_pairs": 0, "skipped_examples": [], "skipped_at_load": load_skips,
               "nonfinite_steps": [], "losses": {}, "data_order": {}, "epochs": {}}  # fmt: skip

    # 6. Train (the progress bar closes even if a step raises). Each optimizer step is one accumulation group of an
    # epoch's micro-batches; an epoch's last group may be shorter, so every pair of every epoch is used once.
    try:
        objective.train()
        while global_step < args.max_train_steps:
            micro_batches = iterate_epoch(args, accelerator, pairs, streaming, position)
            group_indices, group_finite = [], True
            for (indices, batch), place, closes_group in in_groups(micro_batches, args.gradient_accumulation_steps):
                summary["skipped_pairs"] += batch.pop("skipped")
                names = batch.pop("skipped_names")
                summary["skipped_examples"] += names[: SKIPPED_EXAMPLES - len(summary["skipped_examples"])]
                group_indices += indices or []
                encoded = encode_batch(batch, backbone, vae, image_encoder, device)
                batch_size = encoded["target_latents"].shape[0]
                generator = step_generator(args, global_step, place, accelerator)
                sigmas = sample_sigmas(
                    noise_scheduler,
                    batch_size,
                    args.weighting_scheme,
                    args.logit_mean,
                    args.logit_std,
                    args.mode_scale,
                    generator=generator,
                )
                noise = torch.randn(encoded["target_latents"].shape, generator=generator).to(
                    device, encoded["target_latents"].dtype
                )
                # DDP reduces the gradients once per group, at its last micro-batch.
                with nullcontext() if closes_group else accelerator.no_sync(objective):
                    losses = objective(
                        **encoded,
                        noise=noise,
                        sigmas=sigmas.to(device),
                        loss_weights=loss_weighting(args.weighting_scheme, sigmas),
                    )
                    loss = losses["loss"]
                    # All ranks skip together, or DDP would wait forever on the one that stepped.
                    finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
                    if not finite:
                        # Backpropagate a zero through every trainable weight: DDP's reduction stays in step; the
                        # group's optimizer and LR scheduler steps are skipped below.
                        loss = sum(parameter.sum() * 0.0 for parameter in trainable)
                    accelerator.backward(loss)  # divided by the accumulation steps
                group_finite = group_finite and finite
                if not closes_group:
                    continue

                group_size = place + 1
                if group_size < args.gradient_accumulation_steps:  # an epoch's short last group: the mean of its own
                    for parameter in trainable:
                        if parameter.grad is not None:
                            parameter.grad.mul_(args.gradient_accumulation_steps / group_size)
                if group_finite:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                else:
                    summary["nonfinite_steps"].append(global_step + 1)
                    logger.warning(f"Non-finite loss at step {global_step + 1}: step skipped.")
                optimizer.zero_grad(set_to_none=True)
                position.used += group_size
                global_step += 1
                progress.update(1)
                logs = {
                    "loss": loss.detach().item(),
                    "flow_matching": losses["flow_matching"].item(),
                    "delta_consistency": losses["delta_consistency"].item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "skipped_pairs": summary["skipped_pairs"],
                }
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                summary["losses"][global_step] = {k: logs[k] for k in ("flow_matching", "delta_consistency", "lr")}
                summary["data_order"][global_step] = group_indices
                summary["epochs"][global_step] = position.epoch
                group_indices, group_finite = [], True
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step, flags)
                if (
                    args.validation_exemplar
                    and global_step % args.validation_steps == 0
                    and accelerator.is_main_process
                ):
                    render_validation(
                        args, accelerator, objective, pipeline_class, scheduler, feature_extractor, empty_prompt,
                        global_step,
                    )
                if global_step >= args.max_train_steps:
                    break
            else:  # the epoch (or the stream's pass) is used up: the next one
                position.epoch, position.used = position.epoch + 1, 0
    finally:
        progress.close()

    # 7. The release folder: adapter, SigLIP, empty prompt, LoRA, validation grid, model card
    accelerator.wait_for_everyone()
    fingerprint = adapter_fingerprint(accelerator.unwrap_model(objective).adapter).to(device)
    fingerprints = accelerator.gather(fingerprint.unsqueeze(0))  # (ranks, 2)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(objective)
        grid = None
        if args.validation_exemplar:
            grid = render_validation(
                args, accelerator, objective, pipeline_class, scheduler, feature_extractor, empty_prompt, global_step
            )
        save_release(args, model, feature_extractor, empty_prompt, grid, global_step, accelerator.num_processes)
        summary["rank_fingerprints"] = fingerprints.tolist()
        summary["ranks_identical"] = bool((fingerprints == fingerprints[0]).all())
        summary["global_step"] = global_step
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as file:
            json.dump(summary, file, indent=1)
        if summary["skipped_pairs"]:
            examples = ", ".join(summary["skipped_examples"])
            logger.warning(f"Skipped {summary['skipped_pairs']} unreadable pairs in all (the first: {examples}).")
        if not summary["ranks_identical"]:
            raise RuntimeError(f"Adapter weights differ across ranks: {fingerprints.tolist()}")
    # Release DDP (its reducer holds the process group) while every rank is still here, before end_training tears
    # the group down: left to interpreter exit, gloo's destructor can wait forever on a peer that has gone.
    accelerator.wait_for_everyone()
    del objective, optimizer, lr_scheduler
    accelerator.free_memory()
    accelerator.end_training()


class DataPosition:
    """Where training stands in its data: the epoch (for a stream, the pass over it) and how many of this rank's
    micro-batches of it are used. Saved with every checkpoint, so a resumed run goes on with exactly the next one."""

    def __init__(self):
        self.epoch, self.used = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.used = state["epoch"], state["used"]


def iterate_epoch(args, accelerator, pairs, streaming: bool, position: DataPosition):
    """(indices, batch) pairs of this rank's micro-batches of the current epoch, from where `position` stands."""
    if streaming:
        pairs.set_epoch(position.epoch)  # a new pass reshuffles the stream's buffer
        loader = DataLoader(
            pairs, batch_size=args.train_batch_size, collate_fn=collate_pairs, num_workers=args.dataloader_num_workers
        )
        return ((None, batch) for batch in itertools.islice(loader, position.used, None))
    if hasattr(pairs, "set_epoch"):  # random crops differ from epoch to epoch (cached latents have theirs)
        pairs.set_epoch(position.epoch)
    remaining = epoch_batches(len(pairs), position.epoch, args, accelerator)[position.used :]
    loader = DataLoader(
        pairs, batch_sampler=remaining, collate_fn=collate_pairs, num_workers=args.dataloader_num_workers
    )
    return zip(remaining, loader)


def in_groups(items, size: int):
    """`(item, place in its group, whether it closes the group)`, looking one item ahead: a group closes after
    `size` items or at the last item, so the last group of the items may be shorter."""
    iterator, end = iter(items), object()
    current, place = next(iterator, end), 0
    while current is not end:
        following = next(iterator, end)
        closes = place + 1 == size or following is end
        yield current, place, closes
        current, place = following, 0 if closes else place + 1


def adapter_fingerprint(adapter: DeltaAdapterModel) -> torch.Tensor:
    """(2,) float64 summary of all weights; equal on every rank when DDP kept them in sync."""
    flat = torch.cat([parameter.detach().double().flatten() for parameter in adapter.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) % 97
    return torch.stack([flat.sum(), (flat * weights).sum()])


def transformer_lora(transformer) -> dict:
    """The trained LoRA's weights and its config (rank, alpha, targets) as `write_adapter_folder` takes them; empty
    when no LoRA trains."""
    if not getattr(transformer, "peft_config", None):
        return {}
    from peft.utils import get_peft_model_state_dict

    return {
        "lora_state_dict": get_peft_model_state_dict(transformer),
        "lora_metadata": transformer.peft_config["default"].to_dict(),
    }


def load_lora(transformer, folder: str) -> None:
    from peft.utils import set_peft_model_state_dict

    state_dict = backbone_of(transformer).PIPELINE_CLASS.lora_state_dict(folder)
    state_dict = {key.removeprefix("transformer."): value for key, value in state_dict.items()}
    set_peft_model_state_dict(transformer, state_dict)


def edits_one_image_size(args) -> bool:
    """Whether the base pipeline knows one image size only (its `image_size`): the toy world's base editor."""
    try:
        config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    except (OSError, ValueError):
        return False
    return config.get("image_size") is not None


def save_release(args, model, feature_extractor, empty_prompt, grid, global_step: int, num_processes: int) -> None:
    """Writes the folder `load_delta_adapter` reads into `--output_dir`, atomically and with its card (checkpoints
    and logs there stay as they are); pushes it if asked."""
    output_dir = Path(args.output_dir)
    has_examples = bool(args.validation_exemplar)
    extra_files = {}
    if has_examples:

        def write_examples(folder: Path) -> None:
            folder.mkdir()
            for path, name in zip(args.validation_exemplar[0], EXAMPLE_FILES):
                load_image(path).save(folder.parent / name)

        extra_files = {"validation.png": grid.save, "examples": write_examples}
    repo_id = args.hub_model_id or output_dir.name
    card = render_model_card(
        model.adapter,
        repo_id=repo_id,
        base_model=args.pretrained_model_name_or_path,
        image_encoder=args.image_encoder,
        license=args.license,
        datasets=[args.dataset_name] if args.dataset_name else None,
        training={
            "steps": global_step,
            "pairs per step (per device × devices × accumulation)": " × ".join(
                str(n) for n in (args.train_batch_size, num_processes, args.gradient_accumulation_steps)
            ),
            "learning rate": args.learning_rate,
            "λ_delta": args.lambda_delta,
            "resolution": args.resolution,
            "timestep sampling": args.weighting_scheme,
            "mixed precision": args.mixed_precision or "no",
            "LoRA rank": args.lora_rank or "none",
        },
        validation_grid="validation.png" if has_examples else None,
        example_files=has_examples,
        toy_base=edits_one_image_size(args),
    )
    write_adapter_folder(
        output_dir,
        model.adapter,
        model.image_encoder,
        feature_extractor,
        empty_prompt,
        model_card=card,
        extra_files=extra_files,
        **transformer_lora(model.transformer),
    )
    if args.push_to_hub:
        url = push_folder(output_dir, repo_id, token=args.hub_token)
        logger.info(f"Pushed to {url}")


if __name__ == "__main__":
    main(parse_args())
