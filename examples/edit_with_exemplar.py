#!/usr/bin/env python
"""Edit a query image the way an exemplar pair shows, with FLUX.2 [klein] and a Delta-Adapter.

    python examples/edit_with_exemplar.py \
        --adapter org/delta-adapter \
        --source before.png --target after.png --query query.png --output edited.png

The base model and the adapter may be Hub ids or local folders. The text encoder (Qwen3-4B) is loaded only when the
adapter does not ship the empty prompt's embeddings. A bad input or an unreachable Hub prints one line, `error: ...`,
and exits with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from diffusers.utils import load_image
from transformers import AutoTokenizer, Qwen3ForCausalLM

from diffusers_delta import FluxDeltaEditPipeline
from diffusers_delta.adapter_files import AdapterLocation
from diffusers_delta.atomic_folder import write_image_atomically


logger = logging.getLogger("edit_with_exemplar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="black-forest-labs/FLUX.2-klein-4B", help="FLUX.2 [klein] Hub id or folder.")
    parser.add_argument("--adapter", required=True, help="Delta-Adapter Hub id or folder.")
    parser.add_argument("--adapter-subfolder", default=None, help="Subfolder of the adapter inside its repo.")
    parser.add_argument("--image-encoder-folder", default="image_encoder",
                        help="Where the adapter's SigLIP encoder lies: a folder name inside the adapter, or a path "
                             "(absolute, or starting with ./).")  # fmt: skip
    parser.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of the adapter's repo.")
    parser.add_argument("--token", default=None, help="Hub token, for private or gated repos.")
    parser.add_argument("--force-download", action="store_true", help="Download the adapter again.")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    parser.add_argument("--source", required=True, help="Exemplar source image (path or URL).")
    parser.add_argument("--target", required=True, help="Exemplar target image: the source after the edit.")
    parser.add_argument("--query", required=True, help="Image to apply the same edit to.")
    parser.add_argument("--output", required=True, help="Where to write the edited image.")
    parser.add_argument("--scale", type=float, default=1.0, help="Edit strength (0 = the base model).")
    parser.add_argument("--adapt-steps", type=int, default=0,
                        help="First fine-tune the adapter on the exemplar for this many steps (test-time adaptation; "
                             "the paper uses 20). 0 to skip.")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4, help="Denoising steps (4 for the distilled klein).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="Defaults to bfloat16 on CUDA, float32 elsewhere.",
    )
    return parser.parse_args(argv)


def load_pipeline(args: argparse.Namespace) -> FluxDeltaEditPipeline:
    """The base pipeline without its text encoder, the adapter, and the text encoder only if still needed."""
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    pipe = FluxDeltaEditPipeline.from_pretrained(args.base, text_encoder=None, tokenizer=None, dtype=dtype)
    pipe.load_delta_adapter(
        args.adapter,
        subfolder=args.adapter_subfolder,
        image_encoder_folder=args.image_encoder_folder,
        revision=args.revision,
        token=args.token,
        force_download=args.force_download,
    )
    if pipe.empty_prompt_embeds is None:
        logger.warning(
            "The adapter has no empty_prompt_embeds.safetensors: loading the text encoder from %s.", args.base
        )
        pipe.register_modules(
            text_encoder=Qwen3ForCausalLM.from_pretrained(args.base, subfolder="text_encoder", dtype=dtype),
            tokenizer=AutoTokenizer.from_pretrained(args.base, subfolder="tokenizer"),
        )
    return pipe.to(args.device)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        edit(args)
    except (ValueError, OSError) as error:  # bad inputs, files or downloads: the message names the fix
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def edit(args: argparse.Namespace) -> None:
    # Everything that can be checked without the multi-GB base is checked first: the adapter's location (the
    # documentation's placeholder id says so at once) and the three images.
    AdapterLocation.resolve(args.adapter, args.adapter_subfolder, {})
    exemplar = (load_image(args.source), load_image(args.target))
    query = load_image(args.query)
    pipe = load_pipeline(args)
    if args.adapt_steps:
        result = pipe.adapt_to_exemplar(
            *exemplar, num_steps=args.adapt_steps, generator=torch.Generator().manual_seed(args.seed)
        )
        logger.info("Adapted for %d steps: loss %.4f -> %.4f", args.adapt_steps, result.losses[0], result.losses[-1])
    edited = pipe(
        query,
        exemplar=exemplar,
        delta_scale=args.scale,
        num_inference_steps=args.steps,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images[0]
    write_image_atomically(edited, Path(args.output))
    logger.info("Wrote %s", args.output)


if __name__ == "__main__":
    main()
