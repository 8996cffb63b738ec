"""Folder-scale editing: one exemplar's edit applied to every image of a folder, in batches, resumably, and split
between processes under `accelerate launch`.

The exemplar is encoded once; queries of one size are edited together in batches; every output is written whole
(a temporary file, then a rename) under the query's own relative path and name, so a run cut off at any moment
leaves only complete outputs, and the next run skips them. Each query's noise comes from its own generator, seeded
by the run's seed and the query's name, so an output does not depend on the batch it fell in or the process that
edited it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from .atomic_folder import remove_stale_temporaries, write_image_atomically
from .checks import positive_int
from .editing import edited_images
from .image_inputs import read_image_file, read_image_size


#: Formats PIL both reads and writes, by extension (".png" -> "PNG").
WRITABLE_FORMATS = {
    extension: image_format
    for extension, image_format in PIL.Image.registered_extensions().items()
    if image_format in PIL.Image.OPEN and image_format in PIL.Image.SAVE
}


@dataclass
class FolderEditResult:
    """What one process did.

    Args:
        edited: relative paths this process edited and wrote.
        skipped: relative paths whose outputs already existed (of every process: the run's whole listing).
        unreadable: relative paths this process could not read as images (left unedited), with why.
    """

    edited: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    unreadable: dict[Path, str] = field(default_factory=dict)


def list_queries(queries_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The images of a folder and its subfolders, as sorted paths relative to it.

    Hidden files and folders, files of formats PIL cannot both read and write, and anything inside `out_dir` (when it
    lies within `queries_dir`) are left out.

    Args:
        queries_dir: the folder of queries.
        out_dir: the output folder, excluded from the listing.

    Raises:
        ValueError: if `queries_dir` is not a folder, or holds no image.
    """
    root = Path(queries_dir)
    if not root.is_dir():
        raise ValueError(f"--queries {queries_dir} is not a folder of images.")
    out = Path(out_dir).resolve() if out_dir is not None else None
    if out is not None and (out == root.resolve() or out in root.resolve().parents):
        raise ValueError(
            f"--out {out_dir} {'is' if out == root.resolve() else 'holds'} the --queries folder {queries_dir}: write "
            "the outputs to a folder of their own (outputs keep the queries' names and would replace them)."
        )
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in WRITABLE_FORMATS:
            continue
        if out is not None and out in path.resolve().parents:
            continue
        found.append(relative)
    if not found:
        extensions = ", ".join(sorted({".png", ".jpg", ".jpeg", ".webp"} & set(WRITABLE_FORMATS)))
        raise ValueError(f"--queries {queries_dir} holds no image ({extensions}, ...).")
    return sorted(found)


def query_generator(seed: int, relative_path: Path, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one query's noise: seeded by `seed` and the query's name, not by its place in a batch."""
    name_hash = zlib.crc32(os.fsencode(relative_path.as_posix()))  # the name's bytes (Linux names need not be UTF-8)
    return torch.Generator(device).manual_seed((seed * 1_000_003 + name_hash) % 2**63)


def display_name(path: Path) -> str:
    """A path as text that can always be printed (bytes that are not UTF-8 shown as `\\xNN`)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def same_size_batches(
    queries_dir: Path, relative_paths: Sequence[Path], batch_size: int, unreadable: dict[Path, str] | None = None
) -> list[list[Path]]:
    """The queries grouped by size (read from their headers only), in batches of at most `batch_size`, in listing
    order within a size.

    Args:
        queries_dir: the folder the paths are relative to.
        relative_paths: the queries.
        batch_size: the most queries of one batch.
        unreadable: where queries that are not readable images go (path -> why), left out of the batches; without
            it, the first one raises.

    Raises:
        ValueError: naming a query that is not an image (without `unreadable`).
    """
    by_size: dict[tuple[int, int], list[Path]] = {}
    for relative in relative_paths:
        try:
            size = read_image_size(queries_dir / relative, "query")
        except ValueError as error:
            if unreadable is None:
                raise
            unreadable[relative] = str(error)
            continue
        by_size.setdefault(size, []).append(relative)
    return [
        group[start : start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)
    ]


def edit_folder(
    pipe,
    delta_embeds: torch.Tensor,
    queries_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 1,
    seed: int = 0,
    fit: Callable[[list[PIL.Image.Image]], list[PIL.Image.Image]] | None = None,
    state: PartialState | None = None,
    strict: bool = False,
    **call_kwargs,
) -> FolderEditResult:
    """Edits every image of `queries_dir` with one exemplar's edit tokens and writes the outputs under `out_dir`,
    keeping relative paths and names; outputs already there are skipped. Under `accelerate launch`, the queries left
    are split between the processes (`PartialState.split_between_processes`), each writing its share.

    Args:
        pipe: a `FluxDeltaEditPipeline` with its Delta-Adapter loaded.
        delta_embeds: (1, N, D_edit) edit tokens of the exemplar (`pipe.encode_exemplar`), encoded once.
        queries_dir: the folder of queries (subfolders included).
        out_dir: where the outputs go (created if missing).
        batch_size: queries of one size edited together.
        seed: seeds each query's noise, with its name (`query_generator`).
        fit: optional images -> images at a size the model edits (the toy model knows only 64x64); outputs are
            resized back to their query's size.
        state: accelerate's process state (default: `PartialState()`, one process unless launched by accelerate).
        strict: stop at the first query that is not a readable image (a `ValueError` naming it), instead of editing
            every other one and reporting it in `FolderEditResult.unreadable`.
        **call_kwargs: passed to the pipeline call (`num_inference_steps`, `delta_scale`, ...).

    Returns:
        This process's `FolderEditResult`.
    """
    batch_size = positive_int(batch_size, "batch_size")
    queries_dir, out_dir = Path(queries_dir), Path(out_dir)
    state = state or PartialState()
    queries = list_queries(queries_dir, out_dir)
    existing = {relative for relative in queries if (out_dir / relative).exists()}
    pending = [relative for relative in queries if relative not in existing]
    result = FolderEditResult(skipped=[relative for relative in queries if relative in existing])
    if state.is_main_process:  # what a run killed mid-write left: its own temporary files, and only those
        remove_stale_temporaries(out_dir / relative for relative in pending)
    state.wait_for_everyone()  # every process lists the folder before any writes to it
    unreadable = None if strict else result.unreadable
    with state.split_between_processes(pending) as share:
        batches = same_size_batches(queries_dir, share, batch_size, unreadable)
        progress = tqdm(total=len(share), desc="editing", unit="image", disable=not state.is_local_main_process)
        progress.update(len(result.unreadable))
        for names in batches:
            images = []  # one batch in memory at a time
            for name in list(names):
                try:
                    images.append(read_image_file(queries_dir / name, "query"))
                except ValueError as error:  # a header that reads, pixels that do not (a truncated file)
                    if strict:
                        raise
                    result.unreadable[name] = str(error)
                    names.remove(name)
                    progress.update()
            if not names:
                continue
            inputs = fit(images) if fit is not None else images
            generators = [query_generator(seed, name, pipe._execution_device) for name in names]
            outputs = edited_images(pipe, inputs, delta_embeds=delta_embeds, generator=generators, **call_kwargs)
            for name, image, output in zip(names, images, outputs):
                if output.size != image.size:
                    output = output.resize(image.size, PIL.Image.Resampling.BICUBIC)
                write_image_atomically(output, out_dir / name)
                result.edited.append(name)
            progress.update(len(names))
        progress.close()
    state.wait_for_everyone()
    return result
