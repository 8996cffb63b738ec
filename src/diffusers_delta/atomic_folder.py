"""Writing a folder atomically: everything is written into a staging folder beside it, then swapped in.

`atomic_folder(target, owned)` yields an empty staging folder on the same file system as `target`. When the block
ends without error, the staged entries replace the owned entries of `target`: an owned entry that was not staged is
removed (a saved folder holds exactly what was saved), entries that are not owned (a training run's checkpoints, a
user's own files) are left alone. When anything fails, while writing or while swapping, `target` is left exactly as
it was and no staging or backup folder remains.

The swap moves old entries into a backup folder and new ones in with `os.replace` (renames, no copies), restoring
the backup if a rename fails, so a failure can never leave old and new files mixed. Only a process killed in the
middle of the renames can, and then the old entries are kept whole in a `.NAME.old-*` folder beside `target`.

`write_image_atomically` does the same for one image file: a temporary file beside it, then a rename. What is
written gets the modes a plain write would give under the user's umask, not the private ones of temporary files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import PIL.Image


def check_save_directory(save_directory: str | os.PathLike) -> Path:
    """The folder to save into, refused up front when it cannot be one (it is an existing file)."""
    if not isinstance(save_directory, (str, os.PathLike)) or str(save_directory) == "":
        raise TypeError(f"Pass the path of a folder to save into, got {save_directory!r}.")
    target = Path(os.path.abspath(Path(save_directory).expanduser()))  # "." and ".." resolved: the swap needs a parent
    if target.is_file():
        raise ValueError(
            f"{str(save_directory)!r} is a file: pass the path of a folder to save into (it is created if missing)."
        )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"Cannot save into {str(save_directory)!r}: {ancestor} is a file, not a folder.")
    return target


def _make_parents(folder: Path) -> list[Path]:
    """Creates the missing parents of `folder`; returns them, outermost first."""
    missing = []
    parent = folder.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    missing.reverse()
    for path in missing:
        path.mkdir()
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(staging: Path, target: Path, owned: set[str]) -> None:
    """Replaces `target`'s owned entries with the staged ones; on any failure puts every entry back."""
    if not target.exists():
        os.replace(staging, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    new_names = sorted(os.listdir(staging))
    moved_out, moved_in = [], []
    try:
        for name in sorted(owned | set(new_names)):
            if (target / name).exists() or (target / name).is_symlink():
                os.replace(target / name, backup / name)
                moved_out.append(name)
        for name in new_names:
            os.replace(staging / name, target / name)
            moved_in.append(name)
    except BaseException:  # put everything back (with rename: it is replace's twin where the target is free)
        for name in reversed(moved_in):
            os.rename(target / name, staging / name)
        for name in reversed(moved_out):
            os.rename(backup / name, target / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_folder(save_directory: str | os.PathLike, owned: Iterable[str] = ()) -> Iterator[Path]:
    """Stages a folder's new content and swaps it in when complete.

    Args:
        save_directory: the folder to write (created, with missing parents, if it does not exist).
        owned: names of entries in an existing `save_directory` that belong to what is being written: those that the
            new content does not hold are removed. Entries the new content holds are always replaced.

    Yields:
        The empty staging folder to write into.
    """
    target = check_save_directory(save_directory)
    created_parents = _make_parents(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _give_plain_modes(staging)
        _swap_in(staging, target, set(owned))
    except BaseException:
        if created_parents:  # the outermost folder this call created holds everything else it made
            shutil.rmtree(created_parents[0], ignore_errors=True)
        raise
    finally:
        if staging.exists():
            _remove(staging)


def _umask() -> int:
    """The process's umask, read without changing it (`os.umask` can only be read by setting it, which would give
    files other threads create meanwhile the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_plain_modes(folder: Path) -> None:
    """Gives a staged folder and everything in it the modes a plain write gives under the umask: `mkdtemp` makes
    folders 0700, and writers that stage their own files (safetensors) leave them 0600."""
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


#: `write_image_atomically`'s temporary files: `.NAME.` then `mkstemp`'s 8 random characters, then `.tmp`.
_TEMPORARY_IMAGE = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(paths) -> int:
    """Removes the temporary files a killed `write_image_atomically(..., path)` left beside each of `paths` (and only
    those), listing each folder once; returns how many.

    Args:
        paths: the outputs whose leftovers to remove.
    """
    by_folder: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, set()).add(path.name)
    removed = 0
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = _TEMPORARY_IMAGE.fullmatch(entry.name)
            if match and match.group(1) in names and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def _write_atomically(path: Path, write) -> None:
    """Calls `write(binary file)` on a temporary file beside `path`, then renames it to `path` (atomic on one
    filesystem), with the mode a plain write gives under the user's umask; on any failure `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_image_atomically(image: PIL.Image.Image, path: Path) -> None:
    """Writes `image` to `path` whole or not at all (see `write_text_atomically`). The format follows the extension
    (one PIL writes); JPEG is written at quality 95."""
    image_format = PIL.Image.registered_extensions()[path.suffix.lower()]
    extra = {"quality": 95} if image_format == "JPEG" else {}
    _write_atomically(path, lambda file: image.save(file, format=image_format, **extra))


def write_text_atomically(text: str, path: Path) -> None:
    """Writes `text` (UTF-8) to `path` whole or not at all: a temporary file beside it, then a rename, with the mode a
    plain write gives under the user's umask."""
    _write_atomically(path, lambda file: file.write(text.encode("utf-8")))
