"""`diffusers-delta`: the command line. `demo` shows the embedded toy model at work, offline; `edit` edits a query
or a folder of them; `app` serves the Gradio app.

```bash
diffusers-delta demo --out demo.png
diffusers-delta edit --exemplar before.png after.png --query query.png --out edited.png [--base ... --adapter ...]
diffusers-delta edit --exemplar before.png after.png --queries photos/ --out edited/ [--batch-size 8]
accelerate launch -m diffusers_delta.cli edit --exemplar before.png after.png --queries photos/ --out edited/
diffusers-delta app [--base ... --adapter ...] [--port 7860] [--share]
```

Inputs are checked before any model loads. A mistake prints one line, `error: ...`, and exits with code 2 (any
other failure: code 1); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import PIL.Image
import torch

from . import toyworld
from .adapter_files import AdapterLocation
from .atomic_folder import write_image_atomically
from .editing import edited_images
from .evaluation import mean_absolute_error
from .grids import make_edit_grid
from .image_inputs import fit_to_model_size, read_image_file
from .launch import PROCESS_GROUP_TIMEOUT, check_launch_environment, release_process_group
from .toyworld import showcase


class UsageError(Exception):
    """A mistake in the command's inputs: reported in one line, exit code 2."""


def _output_path(path: str, folder_hint: str = "") -> Path:
    """`--out`, checked to name an image format PIL writes; its folder is created if missing. `folder_hint` follows
    the message for a folder given instead."""
    out = Path(path).expanduser()
    if out.is_dir() or path.endswith(("/", "\\")):
        raise UsageError(f"--out {path} is a folder: give an image file name, such as {out / 'edited.png'}"
                         f"{folder_hint}.")  # fmt: skip
    extension = out.suffix.lower()
    image_format = PIL.Image.registered_extensions().get(extension)
    if image_format is None or image_format not in PIL.Image.SAVE:
        raise UsageError(f"--out {path}: {extension or 'no extension'} is not an image format; use .png or .jpg.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _read_image(path: str, what: str) -> PIL.Image.Image:
    """An image file, fully read before any model loads (`read_image_file`), its errors the command's."""
    try:
        return read_image_file(path, what)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_model_sources(args: argparse.Namespace) -> None:
    """`--adapter` and `--base`, checked to exist without loading or downloading anything."""
    if args.adapter is not None:
        _model_source(args.adapter, "--adapter")
    if args.base is not None:
        check_base_source(args.base)


#: Suffixes of a single transformer file (GGUF, safetensors) that a user may give `--base` for a pipeline.
SINGLE_FILE_SUFFIXES = (".gguf", ".safetensors", ".sft", ".ckpt")


def check_base_source(base: str) -> str:
    """`--base`, checked to be a pipeline folder or a Hub id without loading anything: a single transformer file
    (a GGUF quantisation) is told the Python route it takes."""
    path = Path(base).expanduser()
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise UsageError(
            f"--base {base} is a single transformer file; --base takes a pipeline folder or Hub id. Load such a file "
            "in Python: transformer = Flux2Transformer2DModel.from_single_file(file, config=<klein folder>, "
            "subfolder='transformer', quantization_config=GGUFQuantizationConfig(...)), then "
            "FluxDeltaEditPipeline.from_pretrained(<klein folder>, transformer=transformer) and "
            "pipe.load_delta_adapter(...) (docs/using.md: quantised and LoRA'd bases)."
        )
    if path.exists() and not path.is_dir():
        raise UsageError(f"--base {base} is a file: pass a pipeline folder (with model_index.json) or a Hub id.")
    indexes = ("model_index.json", "modular_model_index.json")  # FLUX.3's pipelines are modular only
    if path.is_dir() and not any((path / index).is_file() for index in indexes):
        raise UsageError(
            f"--base {base} holds no model_index.json: pass a diffusers pipeline folder of FLUX.2 [klein] or "
            "FLUX.1 Kontext (or FLUX.3's, with its modular_model_index.json), or its Hub id."
        )
    return _model_source(base, "--base")


def _model_source(source: str, option: str) -> str:
    """A folder or Hub id given to `--base`/`--adapter`, checked without loading or downloading anything."""
    try:
        AdapterLocation.resolve(source, None, {})
    except (OSError, ValueError) as error:
        raise UsageError(f"{option}: {error}") from None
    return source


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = _output_path(args.out)
    world = toyworld.model_world(args.model_dir)
    try:
        examples = showcase.demo_examples(world, args.edits)
    except ValueError as error:
        raise UsageError(f"--edits: {error}") from None
    pipe = toyworld.load_pipeline(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    pairs = {}  # edit name -> (exemplar pair, query and truth): a row that adapts shows its zero-shot row's inputs
    rows, row_labels, lines = [], [], []
    for example in examples:
        if example.edit.name not in pairs:
            draw = args.seed + 2 * len(pairs)
            pairs[example.edit.name] = (example.pair(draw), example.pair(draw + 1))
        (source, target), (query, truth) = pairs[example.edit.name]
        with ExitStack() as adaptation:
            if example.adapt_steps:
                adaptation.enter_context(pipe.adapted_to_exemplar(
                    source, target, num_steps=example.adapt_steps, generator=torch.Generator().manual_seed(args.seed)
                ))  # fmt: skip
            output = pipe(query, exemplar=(source, target), generator=torch.Generator().manual_seed(args.seed))
        output = output.images[0]
        rows.append([source, target, query, output, truth])
        identity, error = mean_absolute_error(query, truth), mean_absolute_error(output, truth)
        split = showcase.SPLIT_LABELS[example.split]
        fails = error >= identity  # the output is further from the truth than the unedited query
        lines.append((example.edit.name, split, example.adapt_steps, identity, error, fails))
        verdict = "\nFAILS: worse than\nthe unedited query" if fails else ""
        row_labels.append(f"{example.label()}\nerror {error:.3f}\n(identity {identity:.3f}){verdict}")
    grid = make_edit_grid(
        rows,
        ["exemplar source", "exemplar target", "query", "output", "truth"],
        cell_size=128,
        row_labels=row_labels,
        row_label_width={showcase.WORLD_1: 110, showcase.WORLD_2: 150, showcase.WORLD_3: 170}[world],
    )
    write_image_atomically(grid, out)
    width = max(len("edit"), *(len(line[0]) for line in lines))
    split_width = max(len(line[1]) for line in lines)
    print("Mean absolute error to the exact truth (0-1): 'identity' leaves the query unedited, 'output' is the "
          "model's edit; a row whose output is no better than identity fails.")  # fmt: skip
    print(f"{'edit':<{width}} {'split':<{split_width}} {'adapted':>7} {'identity':>9} {'output':>9}  verdict")
    for name, split, steps, identity, error, fails in lines:
        verdict = "FAILS (worse than the unedited query)" if fails else "edits"
        print(f"{name:<{width}} {split:<{split_width}} {steps or '':>7} {identity:>9.4f} {error:>9.4f}  {verdict}")
    print(f"Wrote {out} in {time.perf_counter() - start:.1f} s")


def _fit_to_model(pipe, images: list[PIL.Image.Image], names: list[str], back_to=None) -> list[PIL.Image.Image]:
    """For a model that knows one image size only (the toy model), the images resized to it, saying so once (and
    that the output goes back to `back_to`'s size, when given)."""
    fitted = fit_to_model_size(pipe.config.get("image_size"), images, names)
    if fitted is not images:
        side = pipe.config.image_size
        sizes = ", ".join(sorted({f"{image.width}x{image.height}" for image in images}))
        back = ""
        if back_to is not None and back_to.size != (side, side):
            back = f", and the output back to {back_to.width}x{back_to.height}"
        print(f"This model edits {side}x{side} images only: resizing the inputs ({sizes}) to {side}x{side}{back}.",
              file=sys.stderr)  # fmt: skip
    return fitted


def load_edit_pipeline(base: str | None, adapter: str | None, device: torch.device | str | None = None):
    """The pipeline of `--base` (FLUX.2 [klein], FLUX.1 Kontext [dev] or FLUX.3, as its model index says, without its
    text encoders: the adapter brings the empty prompt's embeddings; bfloat16 on CUDA) and `--adapter`, or the
    embedded toy model (with `adapter` instead of its own, if given). FLUX.3's is a modular pipeline.

    Args:
        base: a Hub id or folder of a FLUX.2 [klein], FLUX.1 Kontext or FLUX.3 pipeline, or None for the toy model.
        adapter: a Hub id or folder of a Delta-Adapter (required with `base`).
        device: where to move the pipeline (default: where it loads, the CPU).
    """
    from diffusers.modular_pipelines import ModularPipeline

    from .backbones import BACKBONES
    from .pipelines import delta_pipeline_for

    if base is None:
        model = "the embedded toy-world model (64x64 scenes)"
        if adapter:
            model = f"the embedded toy-world model's base (64x64 scenes) with the adapter {adapter}"
        print(f"No --base given: using {model}.", file=sys.stderr)
        pipe = toyworld.load_pipeline()
        if adapter:
            pipe.load_delta_adapter(adapter)
    elif adapter is None:
        raise UsageError("--adapter is required with --base.")
    else:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        try:
            pipeline_class = delta_pipeline_for(base)
        except ValueError as error:
            raise UsageError(f"--base: {error}") from None
        # no text encoders: the adapter brings the empty prompt's embeddings
        if issubclass(pipeline_class, ModularPipeline):  # FLUX.3: blocks without the text encoder step
            pipe = pipeline_class.from_pretrained(base)
            pipe.load_components(dtype=dtype)
        else:
            text_free = dict.fromkeys(BACKBONES[pipeline_class.backbone].TEXT_COMPONENTS)
            pipe = pipeline_class.from_pretrained(base, **text_free, dtype=dtype)
        pipe.load_delta_adapter(adapter)
    return pipe if device is None else pipe.to(device)


def _folder_output(path: str) -> Path:
    """`--out` of a folder edit: a folder (created if missing), not a file."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} is a file: with --queries, --out is the folder the edited images go to.")
    if not out.exists() and out.suffix.lower() in PIL.Image.registered_extensions():
        raise UsageError(f"--out {path} names an image file: with --queries, --out is the folder the edited images "
                         f"go to (such as {out.with_suffix('')}); --query edits one image into a file.")  # fmt: skip
    return out


def _edit(args: argparse.Namespace) -> None:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .folder_edit import list_queries, same_size_batches

    # 1. Check everything before loading a model
    if args.base is not None and args.adapter is None:
        raise UsageError("--adapter is required with --base.")
    if args.adapt_steps < 0:
        raise UsageError(f"--adapt-steps must be 0 or more, got {args.adapt_steps}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be 1 or more, got {args.batch_size}.")
    source, target = (_read_image(path, what) for path, what in zip(args.exemplar, ("exemplar source", "target")))
    if args.queries is not None:
        out = _folder_output(args.out)
        listed = list_queries(args.queries, out)
        if args.strict:  # every query must be an image: check their headers before a model loads
            same_size_batches(Path(args.queries), listed, 1)
    else:
        query = _read_image(args.query, "query")
        out = _output_path(args.out, " (--queries edits a folder of images into a folder)")
    mask = None
    if args.mask is not None:
        if args.queries is not None:
            raise UsageError("--mask goes with --query: a mask is drawn for one image.")
        mask = _read_image(args.mask, "mask")
        if mask.size != query.size:
            raise UsageError(f"--mask is {mask.width}x{mask.height} and --query {query.width}x{query.height}: give "
                             "the mask at the query's size (white: edit, black: keep).")  # fmt: skip
    _check_model_sources(args)

    # 2-4 run in this process's share of the work; the process group goes at the end, whatever happens
    try:
        check_launch_environment(os.environ)
    except ValueError as error:
        raise UsageError(str(error)) from None
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=PROCESS_GROUP_TIMEOUT)
    try:
        _edit_as_one_of(state, args, source, target, query if args.queries is None else None, out, mask)
    except BaseException:
        release_process_group(state, clean=False)
        raise
    release_process_group(state, clean=True)


def _edit_as_one_of(state, args: argparse.Namespace, source, target, query, out: Path, mask=None) -> None:
    """Steps 2-4 of `_edit` in one of the processes of `state` (one, or one of `accelerate launch`'s); `mask`, the
    `--mask` image of one query."""
    from accelerate.utils import gather_object

    from .folder_edit import display_name, edit_folder

    # 2. Load, on this process's device (one process, or one of `accelerate launch`'s; `--cpu` as Accelerator reads it)
    if args.queries is None and not state.is_main_process:  # one query is one process's work: the others stop
        return
    if args.queries is None and state.num_processes > 1:
        print(f"One --query: edited by one of the {state.num_processes} processes.", file=sys.stderr)
    pipe = load_edit_pipeline(args.base, args.adapter, device=state.device)
    pipe.set_progress_bar_config(disable=True)

    # 3. Encode the exemplar once (at the model's size, when it knows only one), adapting to it first if asked
    side = pipe.config.get("image_size")
    if args.queries is not None:  # the folder's own line says the queries are resized
        source, target = fit_to_model_size(side, [source, target], ["exemplar source", "exemplar target"])
    else:
        source, target, fitted_query = _fit_to_model(
            pipe, [source, target, query], ["exemplar source", "exemplar target", "query"], back_to=query
        )
    if args.adapt_steps:
        result = pipe.adapt_to_exemplar(source, target, num_steps=args.adapt_steps,
                                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        print(f"Adapted for {args.adapt_steps} steps: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    delta_embeds = pipe.encode_exemplar((source, target))

    # 4. Edit, and write back at each query's size
    if args.queries is not None:
        if side is not None and state.is_main_process:
            print(f"This model edits {side}x{side} images only: the exemplar and the queries are resized to it, and "
                  "the outputs back.", file=sys.stderr)  # fmt: skip
        start = time.perf_counter()
        done = edit_folder(pipe, delta_embeds, args.queries, out, batch_size=args.batch_size, seed=args.seed,
                           fit=lambda images: fit_to_model_size(side, images, ["query"] * len(images)), state=state,
                           strict=args.strict)  # fmt: skip
        seconds = time.perf_counter() - start  # every process has finished: edit_folder waits for them all
        counts = gather_object([len(done.edited)])  # one per process
        unreadable = gather_object([(display_name(name), why) for name, why in done.unreadable.items()])
        if not state.is_main_process:
            return
        if sum(counts):
            shares = f" ({' + '.join(map(str, counts))} by {len(counts)} processes)" if len(counts) > 1 else ""
            print(f"Edited {sum(counts)} images into {out}{shares} in {seconds:.1f} s "
                  f"({sum(counts) / seconds:.2f} images/s); {len(done.skipped)} were there already.")  # fmt: skip
        else:
            print(f"Nothing left to edit: {len(done.skipped)} outputs were in {out} already.")
        for name, why in sorted(unreadable):
            print(f"skipped {name}: {why}", file=sys.stderr)
        if unreadable:
            raise UsageError(
                f"{len(unreadable)} of the queries could not be read and were left unedited (named above); every "
                "other output is written. Replace or remove them and run again (--strict stops at the first one)."
            )
        return
    generator = torch.Generator().manual_seed(args.seed)
    if mask is not None:
        edited = _masked_edit(pipe, fitted_query, mask, delta_embeds, generator)
    else:
        edited = edited_images(pipe, fitted_query, delta_embeds=delta_embeds, generator=generator)[0]
    if edited.size != query.size:
        edited = edited.resize(query.size, PIL.Image.Resampling.BICUBIC)
    write_image_atomically(edited, out)
    print(f"Wrote {out}")


def _masked_edit(pipe, query: PIL.Image.Image, mask: PIL.Image.Image, delta_embeds, generator) -> PIL.Image.Image:
    """`--mask`: the edit inside the mask only (`FluxDeltaInpaintPipeline` sharing `pipe`'s models), the mask at the
    (fitted) query's size."""
    from .pipelines import FluxDeltaInpaintPipeline

    try:
        masked = FluxDeltaInpaintPipeline.from_pipe(pipe)  # refuses another backbone's pipeline
    except ValueError as error:
        raise UsageError(f"--mask: {error}") from None
    if mask.size != query.size:  # the query was fitted to a one-size model
        mask = mask.resize(query.size, PIL.Image.Resampling.NEAREST)
    masked.set_progress_bar_config(disable=True)
    return masked(query, mask_image=mask, delta_embeds=delta_embeds, generator=generator).images[0]


def _app(args: argparse.Namespace) -> None:
    try:
        from .app import build_app, describe_model
    except ImportError as error:
        raise UsageError(str(error)) from None
    _check_model_sources(args)
    pipe = load_edit_pipeline(args.base, args.adapter, device="cuda" if torch.cuda.is_available() else None)
    app = build_app(pipe, toy_examples=args.base is None, about=describe_model(args.base, args.adapter, pipe))
    # Gradio's own start-up lines advise `share=True` in `launch()`: this command's lines name its flags instead
    _, local_url, share_url = app.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                                 quiet=True, prevent_thread_lock=True)  # fmt: skip
    print(f"Serving the app at {local_url} (Ctrl+C stops it).", flush=True)
    print(f"Public link: {share_url}" if share_url else "--share also opens a public gradio.live link.", flush=True)
    app.block_thread()


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-delta` parser: its `demo`, `edit` and `app` commands and their flags."""
    parser = argparse.ArgumentParser(prog="diffusers-delta", description="Edit images by example (Delta-Adapter).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", parents=[common], help="Edit toy scenes with the embedded model and write a grid (offline)."
    )
    demo.add_argument("--out", default="delta_demo.png", help="Where to write the grid (its folder is created).")
    demo.add_argument(
        "--edits", nargs="+", default=None, help="Edits to show, by name (default: the model's showcase rows)."
    )
    demo.add_argument("--seed", type=int, default=0, help="Seeds the scenes drawn and the noise.")
    demo.add_argument("--model-dir", default=str(toyworld.DEFAULT_MODEL_DIR), help=argparse.SUPPRESS)
    edit = commands.add_parser("edit", parents=[common], help="Apply an exemplar's edit to a query image.")
    edit.add_argument("--exemplar", nargs=2, required=True, metavar=("SOURCE", "TARGET"),
                      help="The exemplar pair: an image before the edit and the same image after it.")  # fmt: skip
    queries = edit.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", help="One image to edit.")
    queries.add_argument(
        "--queries", help="A folder of images to edit (subfolders too), resumably: existing outputs are skipped."
    )
    edit.add_argument(
        "--out", required=True, help="The edited image (.png, .jpg, ...); with --queries, the folder of outputs."
    )
    edit.add_argument("--mask", default=None,
                      help="With --query: edit only inside this mask (white: edit, black: keep; the query's size; "
                           "FLUX.2 [klein] bases).")  # fmt: skip
    edit.add_argument("--batch-size", type=int, default=1, help="With --queries: queries of one size per batch.")
    edit.add_argument("--strict", action="store_true",
                      help="With --queries: stop before editing when a query is not a readable image (default: "
                           "edit every other one, name it, and exit with an error at the end).")  # fmt: skip
    edit.add_argument(
        "--base", default=None, help="FLUX.2 [klein], FLUX.1 Kontext or FLUX.3 Hub id or folder (default: the toy "
        "model)."
    )
    edit.add_argument("--adapter", default=None, help="Delta-Adapter Hub id or folder.")
    edit.add_argument("--adapt-steps", type=int, default=0, help="Test-time adaptation steps first (0: none).")
    edit.add_argument("--seed", type=int, default=0, help="Seeds the noise of every edit (and the adaptation).")
    app = commands.add_parser("app", parents=[common], help="Serve the Gradio app (needs the [app] extra).")
    app.add_argument(
        "--base", default=None, help="FLUX.2 [klein], FLUX.1 Kontext or FLUX.3 Hub id or folder (default: the toy "
        "model)."
    )
    app.add_argument("--adapter", default=None, help="Delta-Adapter Hub id or folder.")
    app.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    app.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    app.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs `diffusers-delta` with `argv` (default: the process's arguments); a mistake exits with code 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage (argparse would print the top-level one)
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        {"demo": _demo, "edit": _edit, "app": _app}[args.command](args)
    except (UsageError, ValueError, OSError) as error:  # the library's own errors name the fix
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        if args.debug:
            raise
        print(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
