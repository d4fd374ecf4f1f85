"""Writing folders without losing anything: output checks up front, staged writes, checksums.

* :func:`check_output_dir` says, before any work, whether a folder can be written as a
  fresh output: not an existing file, not a non-empty folder (unless ``overwrite``),
  and its nearest existing parent writable.
* :func:`staged_dir` writes into a temporary sibling folder and renames it into place
  only when everything was written, so an interrupted or failed run leaves the target
  as it was (no half-written model, no mix of old and new files).
* :func:`sha256_files` and :func:`verify_files`: checksums of every file of a folder,
  recorded at save time and checked at load time, naming the damaged file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["check_output_dir", "check_writable_dir", "staged_dir", "sha256_files", "verify_files"]

_CHUNK = 1 << 22


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def check_writable_dir(path, *, name: str = "out_dir") -> Path:
    """A folder that can be created (or exists) and written in; for outputs that may be refreshed.

    Raises:
        FileExistsError: ``path`` is an existing file.
        NotADirectoryError: a parent of ``path`` is a file.
        PermissionError: ``path`` (or the parent it would be created in) is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{name} {path} is an existing file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{name} {path}: {base} is a file, so no folder can be created under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {path}: no permission to write in {base}")
    return path


def check_output_dir(path, *, overwrite: bool = False, name: str = "out_dir",
                     overwrite_hint: str = "pass overwrite=True to replace it") -> Path:
    """Whether ``path`` can take a fresh output folder; checked before any work.

    An absent or empty folder is fine; a non-empty one only with ``overwrite`` (the
    whole folder is then replaced, never mixed with the new files). Its parent must be
    writable, since the output is written beside it and renamed into place.

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without ``overwrite``.
        NotADirectoryError, PermissionError: as :func:`check_writable_dir`.
    """
    path = Path(path)
    check_writable_dir(path, name=name)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise FileExistsError(f"{name} {path} is a folder that is not empty ({len(entries)} entries: {shown}); "
                                  f"{overwrite_hint}, or give a new folder")
        # It will be renamed away: its parent must be writable too.
        parent = path.resolve().parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{name} {path}: no permission to write in {parent}, where the new folder is "
                                  "staged before it replaces this one")
    return path


@contextmanager
def staged_dir(path, *, overwrite: bool = False, name: str = "out_dir") -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path``; on success it replaces ``path``.

    If the body raises (or is interrupted), the temporary folder is removed and ``path``
    is left as it was. ``path`` is checked with :func:`check_output_dir` first.
    """
    out = check_output_dir(path, overwrite=overwrite, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(folder, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{path relative to folder (posix): sha256 hex}`` of every file under ``folder``."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in files
            if p.relative_to(folder).as_posix() not in exclude}


def verify_files(folder, checksums: dict[str, str], *, record: str) -> None:
    """Check every file named in ``checksums`` against its recorded sha256.

    Raises:
        ValueError: naming the first missing or damaged file and ``record``, the file
            the checksums came from.
    """
    folder = Path(folder)
    for rel, expected in checksums.items():
        file = folder / rel
        if not file.is_file():
            raise ValueError(f"{file} is missing: {record} lists it")
        if _sha256(file) != expected:
            raise ValueError(f"{file} is damaged: its sha256 differs from the one recorded in {record} when it was "
                             "saved; save the checkpoint again")
