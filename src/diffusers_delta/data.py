"""Exemplar-pair datasets for training: a local folder, Relation252K's side-by-side layout, Pico-Banana-400K's and
NHR-Edit's manifests, or a Hub dataset.

Every dataset yields `{"source": PIL, "target": PIL}` items, or `None` for a pair that cannot be read. The
transformed views (`TransformedPairs`, `TransformedStream`) skip those and count them in each item's `skipped`, so a
batch always has its full size (every rank of a distributed run steps together) and the count reaches the log.

Local folder layouts (`LocalPairDataset`):

    root/source/NAME.png + root/target/NAME.png      (any image suffix; pairs matched by NAME)
    root/metadata.jsonl                              one {"source": "a.png", "target": "b.png"} per line,
                                                     paths relative to root

A manifest is untrusted input: a path it names that leaves its dataset's root once resolved (an absolute path,
`../`, a symbolic link out of the folder) is skipped and counted as unreadable, with a warning naming the record,
unless the dataset is made with `allow_outside_root=True` (the training script's `--allow_paths_outside_dataset`).
Pico-Banana's `local_input_image` is the one path that may be absolute by design (Apple's mapping script writes
absolute paths); a relative one stays inside the images' root like every other.

Unreadable pairs are warned about by name a few at a time (`SkipLog`): the first `SkipLog.NAMED` of each dataset, then
counted only; the training run's summary gives the count and the first names.

Relation252K layout (`SideBySideDataset`): `root/TASK/NAME.jpg`, each file the source (left half) and the target
(right half) side by side; each folder is one editing task. `relation_split` holds out each task's evaluation
exemplar and queries by a seeded rule, and takes the paper's seen-task training subset from the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset

from .image_inputs import pil_to_tensor, to_rgb_image
from .semantic_delta import SiglipPreprocessor


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_UNREADABLE = (OSError, ValueError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError)


def split_side_by_side(image: PIL.Image.Image) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Cuts a side-by-side pair into (left = source, right = target); an odd middle column is dropped."""
    half = image.width // 2
    return image.crop((0, 0, half, image.height)), image.crop((image.width - half, 0, image.width, image.height))


class SkipLog:
    """Warns about a dataset's unreadable pairs by name, the first `NAMED` of them, then only counts them: a dataset of
    1000 records whose images are missing says so in a few lines, not a thousand (the training run's summary gives the
    count and the first names). One per dataset, per process (each data-loading worker has its own)."""

    NAMED = 3

    def __init__(self, dataset: str):
        self.dataset, self.count = dataset, 0

    def __call__(self, what: str, reason) -> None:
        self.count += 1
        if self.count <= self.NAMED:
            logger.warning("Skipping %s: %s", what, reason)
        if self.count == self.NAMED:
            logger.warning("Further unreadable pairs of %s are counted, not named (the run's summary counts them).",
                           self.dataset)  # fmt: skip


def _open_rgb(path: Path, skips: SkipLog) -> PIL.Image.Image | None:
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return to_rgb_image(image, name=str(path), min_side=1)
    except _UNREADABLE as error:
        skips(f"unreadable image {path}", error)
        return None


def inside_root(root: Path, name: str | Path, allow_outside: bool = False) -> Path | None:
    """`root / name`, or None where it leaves `root` once resolved (an absolute `name`, `..`, a symbolic link out).

    Args:
        root: the dataset's root.
        name: a path a manifest gives, meant relative to `root`.
        allow_outside: keep any path (the user vouches for the manifest).
    """
    path = root / name
    if allow_outside:
        return path
    try:
        return path if path.resolve().is_relative_to(root.resolve()) else None
    except (OSError, RuntimeError):  # a symbolic-link loop
        return None


def _outside_warning(count: int, examples: list[str], root: Path) -> None:
    if count:
        logger.warning(
            "Skipped %d records whose paths leave %s (%s): paths are relative to the dataset's folder; pass "
            "allow_outside_root=True (--allow_paths_outside_dataset) if the manifest is yours.",
            count, root, ", ".join(examples[: SkipLog.NAMED]),
        )  # fmt: skip


def _image_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _manifest_records(manifest: Path, required: tuple[str, ...], record_name: str, fix: str) -> Iterator[dict]:
    """The records of a JSON-lines manifest, each checked to hold `required` (non-empty); blank lines are passed over.

    Args:
        manifest: the `.jsonl` file.
        required: keys every record must hold.
        record_name: what a record is, for errors (`"an NHR-Edit record"`).
        fix: what to pass instead, for errors.

    Raises:
        ValueError: the manifest is missing, or a line is not JSON or not such a record (named with its line number).
    """
    if not manifest.is_file():
        raise ValueError(f"No manifest at {manifest}: {fix}.")
    with open(manifest, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}:{number} is not JSON ({error.msg}): {fix}.") from None
            if not isinstance(record, dict) or any(not record.get(key) for key in required):
                raise ValueError(
                    f"{manifest}:{number} is not {record_name} (it needs {' and '.join(required)}): {fix}."
                )
            yield record


class LocalPairDataset(Dataset):
    """Pairs from a local folder (`source/` + `target/`, or `metadata.jsonl`; see the module docstring).

    Args:
        root: the folder.
        allow_outside_root: read paths that leave the folder (absolute ones, `..`, links out of it); by default those
            pairs are skipped and counted.

    Attributes:
        skipped_at_load: pairs left out before reading, by why (`"outside the root"`, `"missing"`).
    """

    def __init__(self, root: str | Path, allow_outside_root: bool = False):
        self.root = Path(root)
        self.skips = SkipLog(str(self.root))
        metadata = self.root / "metadata.jsonl"
        if metadata.is_file():
            fix = 'write one {"source": "a.png", "target": "b.png"} per line, paths relative to the folder'
            records = _manifest_records(metadata, ("source", "target"), "a pair record", fix)
            named = [(r["source"], r["target"]) for r in records]
        elif (self.root / "source").is_dir() and (self.root / "target").is_dir():
            sources, targets = _image_files(self.root / "source"), _image_files(self.root / "target")
            named = [(sources[n].relative_to(self.root), targets[n].relative_to(self.root))
                     for n in sorted(sources.keys() & targets.keys())]  # fmt: skip
            unmatched = len(sources.keys() ^ targets.keys())
            if unmatched:
                logger.warning("Skipped %d images of %s without a counterpart.", unmatched, self.root)
        else:
            raise ValueError(
                f"{self.root} is not a pair folder: expected source/ and target/ subfolders with matching file "
                'names, or a metadata.jsonl with one {"source": ..., "target": ...} per line.'
            )
        pairs, outside = [], []
        for source, target in named:
            paths = tuple(inside_root(self.root, name, allow_outside_root) for name in (source, target))
            if None in paths:
                outside.append(str(source if paths[0] is None else target))
            else:
                pairs.append(paths)
        _outside_warning(len(outside), outside, self.root)
        self.pairs, missing = [], []
        for source, target in pairs:  # each file looked at once
            absent = next((path for path in (source, target) if not path.is_file()), None)
            if absent is None:
                self.pairs.append((source, target))
            else:
                missing.append(str(absent))
        if missing:
            logger.warning("Skipped %d pairs of %s whose files are missing (%s).", len(missing), self.root,
                           ", ".join(missing[: SkipLog.NAMED]))  # fmt: skip
        self.skipped_at_load = {"outside the root": len(outside), "missing": len(missing)}
        if not self.pairs:
            raise ValueError(f"No readable pairs in {self.root}.")

    def __len__(self) -> int:
        return len(self.pairs)

    def name_of(self, index: int) -> str:
        """The pair at `index`, as a person finds it (its source's path)."""
        return str(self.pairs[index][0])

    def __getitem__(self, index: int) -> dict | None:
        source_path, target_path = self.pairs[index]
        source, target = _open_rgb(source_path, self.skips), _open_rgb(target_path, self.skips)
        return None if source is None or target is None else {"source": source, "target": target}


def side_by_side_files(root: str | Path) -> list[Path]:
    """The pair images of a Relation252K-style folder (`root/TASK/NAME.ext`), sorted."""
    root = Path(root)
    files = sorted(p for p in root.glob("*/*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"No side-by-side images in {root}: expected {root}/TASK/NAME.jpg files.")
    return files


@dataclass
class RelationSplit:
    """Relation252K split into training pairs and, per task, an evaluation exemplar and queries (see `relation_split`).

    Args:
        train: the pair images to train on.
        evaluation: task -> (its exemplar pair image, its query pair images; their right halves are the truths).
    """

    train: list[Path]
    evaluation: dict[str, tuple[Path, list[Path]]]


def _seeded_key(seed: int, path: Path) -> str:
    return hashlib.sha256(f"{seed}/{path.parent.name}/{path.name}".encode()).hexdigest()


def relation_split(
    root: str | Path, seed: int = 0, queries_per_task: int = 5, train_pairs: int | None = None
) -> RelationSplit:
    """The seen-task evaluation split and training pairs of a Relation252K-style folder, by a seeded rule.

    In each task folder the pairs are ordered by `sha256("{seed}/{task}/{name}")`: the first is the task's evaluation
    exemplar, the next `queries_per_task` its evaluation queries (a task of fewer pairs gives all but the exemplar),
    and the rest are training pairs; a task of one pair only trains. With `train_pairs`, training takes that many,
    the first of all tasks' training pairs in the same order (the paper's seen-task setting trains on 16 000). No
    evaluation pair is ever a training pair, whatever the arguments; the same seed gives the same split on any
    machine (names, not listing order, decide it).

    Args:
        root: the dataset folder (`root/TASK/NAME.ext`, each image source|target side by side).
        seed: the split's seed.
        queries_per_task: evaluation queries per task (the paper: 5, over Relation's 218 tasks).
        train_pairs: how many training pairs to keep (None: all).
    """
    by_task = {}
    for path in side_by_side_files(root):
        by_task.setdefault(path.parent.name, []).append(path)
    train, evaluation = [], {}
    for task, files in sorted(by_task.items()):
        files = sorted(files, key=lambda path: _seeded_key(seed, path))
        if len(files) < 2:
            train += files
            continue
        held = files[: 1 + queries_per_task]
        evaluation[task] = (held[0], held[1:])
        train += files[1 + queries_per_task :]
    train = sorted(train, key=lambda path: _seeded_key(seed, path))
    if train_pairs is not None:
        if train_pairs > len(train):
            raise ValueError(
                f"{root} holds {len(train)} training pairs after the evaluation split: fewer than {train_pairs}."
            )
        train = train[:train_pairs]
    return RelationSplit(sorted(train), evaluation)


class SideBySideDataset(Dataset):
    """Relation252K's layout: `root/TASK/NAME.ext`, each image a source|target pair side by side.

    Args:
        root: the dataset folder (one subfolder per task).
        files: the pair images to use (default: all of them; `relation_split(...).train` for a held-out split).
    """

    def __init__(self, root: str | Path, files: list[Path] | None = None):
        self.root = Path(root)
        self.files = side_by_side_files(self.root) if files is None else list(files)
        self.tasks = sorted({p.parent.name for p in self.files})
        self.skips = SkipLog(str(self.root))

    def __len__(self) -> int:
        return len(self.files)

    def name_of(self, index: int) -> str:
        """The pair at `index`, as a person finds it (its side-by-side image's path)."""
        return str(self.files[index])

    def __getitem__(self, index: int) -> dict | None:
        image = _open_rgb(self.files[index], self.skips)
        if image is None or image.width < 2:
            return None
        source, target = split_side_by_side(image)
        return {"source": source, "target": target}


class PicoBananaDataset(Dataset):
    """Pico-Banana-400K's single-turn edits (its `sft.jsonl`), read as published.

    Each line is `{"open_image_input_url", "text", "output_image", "edit_type", "summarized_text", ...}`: the
    source is an Open Images photo, the target `output_image` (a path such as `images/positive-edit/1.png` under
    Apple's CDN prefix). Download the edited images keeping those paths under `images_root` (by default the manifest's
    folder), and the sources either as Apple's `map_openimage_url_to_local.py` records them (`local_input_image`,
    absolute or relative to `images_root`) or named by their URL's file name in `source_images_dir`. Pairs whose
    files are missing or unreadable are skipped and counted. The instruction is kept as metadata (`instruction`,
    `edit_type`), never used as a condition: Delta-Adapter is text-free.

    Paths stay inside their roots (`output_image` and a relative `local_input_image` inside `images_root`, a source
    found by its URL's file name inside `source_images_dir`); an absolute `local_input_image` is read where it points,
    as Apple's mapping script may write them: a record naming another path is skipped, with a warning naming it.

    Args:
        manifest: the `sft.jsonl` file.
        images_root: where `output_image` paths (and relative `local_input_image` ones) start.
        source_images_dir: a folder of the Open Images sources by file name, for records without `local_input_image`.
        allow_outside_root: read relative paths that leave their root too.
    """

    def __init__(
        self, manifest: str | Path, images_root: str | Path | None = None, source_images_dir=None,
        allow_outside_root: bool = False,
    ):  # fmt: skip
        self.allow_outside_root = allow_outside_root
        self.manifest = Path(manifest)
        self.skips = SkipLog(str(self.manifest))
        self.images_root = Path(images_root) if images_root is not None else self.manifest.parent
        self.source_images_dir = Path(source_images_dir) if source_images_dir is not None else None
        self.records = list(_manifest_records(
            self.manifest, ("output_image", "open_image_input_url"), "a Pico-Banana single-turn record",
            "pass the sft.jsonl manifest",
        ))  # fmt: skip

    def __len__(self) -> int:
        return len(self.records)

    def _source_path(self, record: dict) -> Path | None:
        local = record.get("local_input_image")
        if local:
            if Path(local).is_absolute():  # the documented exception: absolute by design
                return Path(local)
            return inside_root(self.images_root, local, self.allow_outside_root)
        return inside_root(self.source_images_dir, record["open_image_input_url"].rsplit("/", 1)[-1],
                           self.allow_outside_root)  # fmt: skip

    def name_of(self, index: int) -> str:
        """The pair at `index`, as a person finds it (the manifest and the record's edited image)."""
        return f"{self.manifest}:{self.records[index]['output_image']}"

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        if not record.get("local_input_image") and self.source_images_dir is None:
            self.skips(record["output_image"], "no local source image (run map_openimage_url_to_local.py)")
            return None
        source_path = self._source_path(record)
        target_path = inside_root(self.images_root, record["output_image"], self.allow_outside_root)
        if source_path is None or target_path is None:
            self.skips(f"the record of {record['output_image']!r}", f"a path leaves {self.images_root} (see "
                       "allow_outside_root, --allow_paths_outside_dataset)")  # fmt: skip
            return None
        source, target = _open_rgb(source_path, self.skips), _open_rgb(target_path, self.skips)
        if source is None or target is None:
            return None
        return {
            "source": source,
            "target": target,
            "instruction": record.get("text"),
            "edit_type": record.get("edit_type"),
        }


class NHREditDataset(Dataset):
    """NHR-Edit's triplets, read as published: `train/metadata.jsonl` beside `train/images/NN/`.

    Each line is one triplet, `{"sample_id", "source_file_name", "edited_file_name", "edit_instruction", "category",
    "kind", "style", ...}`; an original (`images/00/image_X_original.jpg`) has several edits
    (`image_X_edited_Y.jpg`), each its own pair. File names are taken relative to the manifest's folder, or to the
    dataset's root above it when they start there (`train/images/...`). Pairs whose files are missing or unreadable
    are skipped and counted; the instruction is kept as metadata (`instruction`; `edit_type` from `category`; `kind`,
    how the triplet was mined), never used as a condition. (Field names as NHR-Edit's published manifest and public
    readers of it name them; the card lists the fields without their keys.)

    Paths stay inside the root they are taken relative to: a record naming an absolute path or one climbing out
    (`../`) is skipped, with a warning naming it, unless `allow_outside_root`.

    Args:
        metadata: the `metadata.jsonl` file, or a folder holding it (or holding `train/metadata.jsonl`).
        allow_outside_root: read paths that leave the dataset's folder too.
    """

    def __init__(self, metadata: str | Path, allow_outside_root: bool = False):
        self.allow_outside_root = allow_outside_root
        metadata = Path(metadata)
        if metadata.is_dir():
            candidates = [metadata / "metadata.jsonl", metadata / "train" / "metadata.jsonl"]
            metadata = next((path for path in candidates if path.is_file()), candidates[0])
        self.metadata = metadata
        records = _manifest_records(
            self.metadata, ("source_file_name", "edited_file_name"), "an NHR-Edit record",
            "pass NHR-Edit's folder or its train/metadata.jsonl",
        )  # fmt: skip
        self.records = [  # (source, edited, instruction, category, kind): tuples, small beside 720K dicts
            (r["source_file_name"], r["edited_file_name"], r.get("edit_instruction"), r.get("category"), r.get("kind"))
            for r in records
        ]
        self.roots = [self.metadata.parent, self.metadata.parent.parent]
        self.skips = SkipLog(str(self.metadata))

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, name: str) -> Path | None:
        """`name` under the first root where it is a file (else the first), None where it leaves that root."""
        paths = [inside_root(root, name, self.allow_outside_root) for root in self.roots]
        return next((path for path in paths if path is not None and path.is_file()), paths[0])

    def name_of(self, index: int) -> str:
        """The pair at `index`, as a person finds it (the metadata file and the record's edited image)."""
        return f"{self.metadata}:{self.records[index][1]}"

    def __getitem__(self, index: int) -> dict | None:
        source_name, edited_name, instruction, category, kind = self.records[index]
        source_path, edited_path = self._path(source_name), self._path(edited_name)
        if source_path is None or edited_path is None:
            self.skips(f"the record of {edited_name!r}", f"a path leaves {self.roots[0]} (see allow_outside_root, "
                       "--allow_paths_outside_dataset)")  # fmt: skip
            return None
        source, target = _open_rgb(source_path, self.skips), _open_rgb(edited_path, self.skips)
        if source is None or target is None:
            return None
        return {"source": source, "target": target, "instruction": instruction, "edit_type": category, "kind": kind}


def mix_probabilities(count: int, weights: list[float], what: str) -> torch.Tensor:
    """A mix's weights, checked (one per source, positive), as (count,) float64 probabilities."""
    if len(weights) != count or not count:
        raise ValueError(f"{count} {what} and {len(weights)} weights: give one weight per {what[:-1]}.")
    if any(not (weight > 0 and math.isfinite(weight)) for weight in weights):
        raise ValueError(f"Mix weights must be positive finite numbers, got {weights}.")
    return torch.tensor(weights, dtype=torch.float64) / sum(weights)


class MixedPairs(Dataset):
    """Several pair datasets mixed by weight, as one map-style dataset (the training script's `--data_mix`).

    Position `i` comes from source `k` with probability `w_k / Σ w`, by a table drawn once from `seed`; each source
    serves its items in a seeded order and starts that order again when the mix asks for more items than it has
    (a small source weighted up repeats, a large one weighted down is sampled). The mix is a function of the seed
    alone, so a resumed run reads the same pairs.

    Args:
        sources: the datasets (items `{"source": PIL, "target": PIL}`, or None for a pair that cannot be read).
        weights: their sampling weights, positive.
        seed: the table's seed.
        length: the mix's length, an epoch (default: the sources' total).
        names: what to call each source in errors (the training script's `KIND:PATH`; default: its position).
    """

    def __init__(
        self, sources: list[Dataset], weights: list[float], seed: int = 0, length: int | None = None,
        names: list[str] | None = None,
    ):  # fmt: skip
        probabilities = mix_probabilities(len(sources), weights, "sources")
        names = names or [f"number {k + 1}" for k in range(len(sources))]
        empty = [name for name, source in zip(names, sources) if len(source) == 0]
        if empty:
            raise ValueError(f"The mix's source {empty[0]} holds no pairs: remove it from the mix or fill it.")
        self.sources = sources
        length = sum(len(source) for source in sources) if length is None else length
        generator = torch.Generator().manual_seed(seed)
        self.source_of = torch.multinomial(probabilities, length, replacement=True, generator=generator)  # (L,)
        orders = [torch.randperm(len(source), generator=generator) for source in sources]
        self.item_of = torch.empty(length, dtype=torch.long)  # (L,)
        for k, order in enumerate(orders):
            positions = (self.source_of == k).nonzero().flatten()
            self.item_of[positions] = order[torch.arange(len(positions)) % len(order)]

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, index: int) -> dict | None:
        return self.sources[int(self.source_of[index])][int(self.item_of[index])]

    def name_of(self, index: int) -> str:
        """The pair at `index`, as its source dataset names it, with that source's kind and path."""
        return pair_name(self.sources[int(self.source_of[index])], int(self.item_of[index]))


def _hub_pair(example: dict, source_column: str, target_column: str, skips: SkipLog) -> dict | None:
    try:
        return {
            "source": to_rgb_image(example[source_column], name=source_column, min_side=1),
            "target": to_rgb_image(example[target_column], name=target_column, min_side=1),
        }
    except (*_UNREADABLE, TypeError, KeyError) as error:
        skips("an unreadable Hub example", error)
        return None


class HubPairDataset(Dataset):
    """A map-style `datasets.Dataset` with a source and a target image column.

    Args:
        dataset: the loaded `datasets.Dataset`.
        source_column: the column holding source images.
        target_column: the column holding target images.
    """

    def __init__(self, dataset, source_column: str, target_column: str):
        missing = {source_column, target_column} - set(dataset.column_names)
        if missing:
            raise ValueError(f"The dataset has no column {sorted(missing)}; its columns are {dataset.column_names}.")
        self.dataset, self.source_column, self.target_column = dataset, source_column, target_column
        self.skips = SkipLog("the Hub dataset")

    def __len__(self) -> int:
        return len(self.dataset)

    def name_of(self, index: int) -> str:
        """The pair at `index`: the dataset's row number."""
        return f"example {index}"

    def __getitem__(self, index: int) -> dict | None:
        return _hub_pair(self.dataset[index], self.source_column, self.target_column, self.skips)


class StreamingHubPairDataset(IterableDataset):
    """A streaming `datasets.IterableDataset` with a source and a target image column (already split per rank).

    Args:
        dataset: the streaming dataset.
        source_column: the column holding source images.
        target_column: the column holding target images.
    """

    def __init__(self, dataset, source_column: str, target_column: str):
        self.dataset, self.source_column, self.target_column = dataset, source_column, target_column
        self.skips = SkipLog("the Hub stream")

    def set_epoch(self, epoch: int) -> None:
        """Passes `epoch` to the `datasets` stream, whose shuffle then depends on the seed and the epoch."""
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        for example in self.dataset:
            yield _hub_pair(example, self.source_column, self.target_column, self.skips)


_EMPTY = object()  # what `next` gives for a stream with nothing in it (None is a pair that could not be read)


class MixedStream(IterableDataset):
    """Several pair streams mixed by weight (the training script's `--data_mix` with `--streaming`).

    Each next pair comes from stream `k` with probability `w_k / Σ w`, drawn by a generator seeded with the seed and
    the epoch; a stream that runs out starts again, until every stream has run out once (a pass). A function of the
    seed and the epoch alone: a resumed run that skips the pairs it used reads the same ones next.

    Args:
        streams: the pair streams (`StreamingHubPairDataset`s, each already this rank's share).
        weights: their sampling weights, positive.
        seed: the draws' seed.
    """

    def __init__(self, streams: list[IterableDataset], weights: list[float], seed: int = 0):
        self.probabilities = mix_probabilities(len(streams), weights, "streams")
        self.streams, self.seed, self.epoch = streams, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the mix's draws and of every source stream, so that resuming mid-epoch is exact."""
        self.epoch = epoch
        for stream in self.streams:
            stream.set_epoch(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        iterators = [iter(stream) for stream in self.streams]
        finished = [False] * len(self.streams)
        while True:
            k = int(torch.multinomial(self.probabilities, 1, generator=generator))
            try:
                pair = next(iterators[k])
            except StopIteration:
                finished[k] = True
                if all(finished):
                    return
                iterators[k] = iter(self.streams[k])  # once more round, while another stream has pairs left
                pair = next(iterators[k], _EMPTY)
                if pair is _EMPTY:  # an empty stream (a None pair is an unreadable one: the mix goes on)
                    return
            yield pair


#: The granularity of a real backbone's training resolution: its VAE's 8x downsampling, then 2x2 patches.
RESOLUTION_MULTIPLE = 16


def check_resolution(resolution: int, multiple_of: int = RESOLUTION_MULTIPLE, flag: str = "--resolution") -> None:
    """Refuses a training resolution the backbone cannot take: a positive multiple of `multiple_of`.

    Raises:
        ValueError: naming `flag`, the value and the nearest sizes that work.
    """
    if resolution < multiple_of or resolution % multiple_of:
        lower = max(multiple_of, resolution // multiple_of * multiple_of)
        raise ValueError(
            f"{flag} must be a multiple of {multiple_of} (the VAE's downsampling times the 2x2 patches), got "
            f"{resolution}: try {lower} or {lower + multiple_of}."
        )


class PairTransform:
    """PIL pair -> tensors for the VAE (square, [-1, 1]) and for SigLIP (normalised).

    Args:
        resolution: side of the square training images (resized on the short side, then cropped).
        siglip_preprocessor: SigLIP's preprocessing.
        multiple_of: the VAE-and-patchify granularity the resolution must respect.
        center_crop: crop at the centre; otherwise at a random place, the same for both images of a pair, drawn from
            the `seed` and the key each call passes (epoch and pair), so that a resumed run crops as the whole did.
        seed: seeds the random crops.
    """

    def __init__(
        self,
        resolution: int,
        siglip_preprocessor: SiglipPreprocessor,
        multiple_of: int = RESOLUTION_MULTIPLE,
        center_crop: bool = True,
        seed: int = 0,
    ):
        check_resolution(resolution, multiple_of)
        self.resolution = resolution
        self.siglip_preprocessor = siglip_preprocessor
        self.center_crop = center_crop
        self.seed = seed

    def _crop_place(self, key: str) -> tuple[float, float]:
        """Where to crop, as fractions (0: left/top, 1: right/bottom) of the room there is."""
        if self.center_crop:
            return 0.5, 0.5
        digest = hashlib.sha256(f"{self.seed}/{key}".encode()).digest()
        return digest[0] / 255, digest[1] / 255

    def _square(self, image: PIL.Image.Image, place: tuple[float, float]) -> torch.Tensor:
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.BICUBIC)
        left = round((image.width - self.resolution) * place[0])
        top = round((image.height - self.resolution) * place[1])
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return pil_to_tensor(image)  # (3, R, R) in [0, 1]

    def __call__(self, pair: dict | None, key: str = "") -> dict | None:
        """Args: pair: `{"source", "target"}` PIL images, or `None`; key: names the pair (and epoch) for the crop."""
        if pair is None:
            return None
        place = self._crop_place(key)
        source, target = self._square(pair["source"], place), self._square(pair["target"], place)  # (3, R, R) each
        siglip = self.siglip_preprocessor(torch.stack([source, target]))  # (2, 3, S, S)
        return {
            "source_pixels": source * 2 - 1,
            "target_pixels": target * 2 - 1,
            "source_siglip": siglip[0],
            "target_siglip": siglip[1],
        }


class TransformedPairs(Dataset):
    """Applies a `PairTransform` to a map-style pair dataset; an unreadable pair is replaced by the next readable one.

    The replacement is deterministic (the next index, wrapping around), so the data order of a run stays a pure
    function of its seed; `skipped` in the item counts the pairs passed over and `skipped_names` names them
    (`pair_name`). `set_epoch` makes random crops differ from epoch to epoch.
    """

    def __init__(self, pairs: Dataset, transform: PairTransform):
        self.pairs, self.transform, self.epoch = pairs, transform, 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that, with the seed and the pair, decides each pair's random crop."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.pairs)):
            position = (index + offset) % len(self.pairs)
            item = self.transform(self.pairs[position], key=f"{self.epoch}/{position}")
            if item is not None:
                names = [pair_name(self.pairs, (index + k) % len(self.pairs)) for k in range(offset)]
                return {**item, "skipped": offset, "skipped_names": names}
        raise ValueError("No pair of the dataset can be read.")


class TransformedStream(IterableDataset):
    """Applies a `PairTransform` to a streaming pair dataset, dropping unreadable pairs and counting them."""

    def __init__(self, pairs: StreamingHubPairDataset, transform: PairTransform):
        self.pairs, self.transform, self.epoch = pairs, transform, 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the crops and of the stream below, so that resuming mid-epoch is exact."""
        self.epoch = epoch
        self.pairs.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        for position, pair in enumerate(self.pairs):
            item = self.transform(pair, key=f"{self.epoch}/{position}")
            if item is None:
                skipped += 1
                continue
            yield {**item, "skipped": skipped}
            skipped = 0


def pair_name(dataset: Dataset, index: int) -> str:
    """How a person finds the pair at `index` (its file or record), where the dataset can say."""
    return dataset.name_of(index) if hasattr(dataset, "name_of") else f"pair {index}"


def collate_pairs(items: list[dict]) -> dict:
    """Stacks a batch of transformed pairs; `skipped` sums the unreadable pairs passed over to fill it and
    `skipped_names` lists them (where their dataset names them)."""
    counts = ("skipped", "skipped_names")
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key not in counts}
    batch["skipped"] = sum(item.get("skipped", 0) for item in items)
    batch["skipped_names"] = [name for item in items for name in item.get("skipped_names", ())]
    return batch
