"""Whole files written so that a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`, with its suffix (writers that take the format from it
    work). Once the caller has written it, it is fsynced and renamed over `path` in one step; if
    the caller raises, it is removed and `path` is left as it was.

        with atomic_path(out / "results.csv") as tmp:
            table.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(temporary path)`, then the rename of `atomic_path`:
    `write_atomically(out / "summary.csv", summary.to_csv)`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_file_atomically(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write(binary file)` for writers that take an open file (`fig.savefig`, PIL's `save`,
    bytes), then the rename of `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        write(file)
    return Path(path)


def fsync_directory(directory: Path) -> None:
    """Make a file's creation or rename in `directory` durable (POSIX; a no-op where directories
    cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
