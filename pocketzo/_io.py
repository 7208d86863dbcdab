"""Atomic file and directory output: nothing half-written is ever left under a final name.

What these helpers write is readable by everyone, whatever the umask: files 0o644, directories
0o755. Bundles, runs and merged models are copied to phones and served to browsers as they are.

Stdlib only, so the device side can use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE, DIR_MODE = 0o644, 0o755


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success fsync it and rename it over ``path``.

    Text modes write UTF-8 with ``\\n`` line endings on every platform. The file gets
    ``FILE_MODE`` (not mkstemp's 0o600). On any exception the temp file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = "b" not in mode
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if text else None, newline="\n" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp directory next to ``path``; on success it replaces ``path``.

    Whatever was at ``path`` (file or directory) is removed only once the new directory is
    in place. Before that, the directory and every directory in it get ``DIR_MODE`` and every
    file ``FILE_MODE``, however they were written (mkdtemp makes 0o700; onnx writes external
    data 0o600). On any exception the temp directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _make_readable(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, final: Path) -> None:
    """Rename ``new`` onto ``final``, even if ``final`` is a non-empty directory."""
    if not os.path.lexists(final):
        os.replace(new, final)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    try:
        os.replace(final, trash / final.name)
        try:
            os.replace(new, final)
        except BaseException:
            os.replace(trash / final.name, final)  # put the old one back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """``DIR_MODE`` on ``directory`` and the directories in it, ``FILE_MODE`` on its files (not via links)."""
    os.chmod(directory, DIR_MODE)
    for root, dirs, files in os.walk(directory):
        for names, mode in ((dirs, DIR_MODE), (files, FILE_MODE)):
            for name in names:
                if not os.path.islink(p := os.path.join(root, name)):
                    os.chmod(p, mode)


def write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented UTF-8 JSON with a trailing newline, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=sort_keys)
        f.write("\n")


def sha256_file(path: str | os.PathLike[str], h: Any = None) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (``h``: continue an existing hash)."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
