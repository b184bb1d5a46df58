"""Shard files: one line per completed item, appended and fsynced the moment the item completes.

A line is `<crc32 of the payload, 8 hex digits> <payload>\\n`; the payload is compact JSON,
`{"key": <item key>, "rows": [<row>, ...]}` (`cut -c10- shard-00000.jsonl | jq` reads it). A line
cut short by a SIGKILL or a power loss mid-write, or whose checksum fails, is no record: readers
skip it, so the item is computed again, and the process that owns the file cuts it off before
appending, so that the next record starts on a line of its own.

Row values keep their Python types through the file: None, bool, int, float, str, lists, and
tuples (boxes), written as `{"__tuple__": [...]}`; NaN and the infinities, which JSON lacks, as
`{"__float__": "nan"}` (so every line is strict JSON); numpy scalars as the Python scalars they hold.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from filelock import FileLock, Timeout

from hooked_vlm.runs.files import fsync_directory

ROWS = "rows"  # the folder of shard files inside a run directory
TUPLE, FLOAT = "__tuple__", "__float__"


class RunBusy(RuntimeError):
    """Another process holds this shard: the same run is already going."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.jsonl"))


# ---------------------------------------------------------------------------------- lines
def encode(key: str, rows: list[dict]) -> bytes:
    record = {"key": key, "rows": [_row(row) for row in rows]}
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = payload.encode()
    return b"%08x " % zlib.crc32(data) + data + b"\n"


def decode(line: bytes) -> tuple[str, list[dict]] | None:
    """(key, rows) of one line without its newline; None if it is not a whole, intact record."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        checksum = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    if zlib.crc32(payload) != checksum:
        return None
    try:
        record = json.loads(payload, object_hook=_untag)
        return record["key"], record["rows"]
    except (ValueError, KeyError, TypeError):  # an intact line that is no record (written by hand?)
        return None


def _row(row: dict) -> dict:
    for column in row:
        if not isinstance(column, str):
            raise TypeError(f"a row's column names are strings, got {column!r}")
    return {column: _value(value, column) for column, value in row.items()}


def _value(value: Any, column: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT: str(value)}  # "nan", "inf", "-inf"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [_value(v, column) for v in value]}
    if isinstance(value, list):
        return [_value(v, column) for v in value]
    if isinstance(value, np.generic):
        return _value(value.item(), column)
    raise TypeError(f"cannot record column {column!r}: a {type(value).__name__} ({value!r}) is not a plain value")


def _untag(obj: dict) -> Any:
    if len(obj) == 1 and TUPLE in obj:
        return tuple(obj[TUPLE])
    if len(obj) == 1 and FLOAT in obj:
        return float(obj[FLOAT])
    return obj


# ---------------------------------------------------------------------------------- files
def read_shard(path: Path) -> tuple[list[tuple[str, list[dict]]], int, int]:
    """(records in file order, the byte offset just after the last intact record, how many
    damaged lines lie before it). Lines after that offset are a torn tail, not damage."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    records, end, offset, damaged, damaged_before_end = [], 0, 0, 0, 0
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline: empty, or a torn write
        offset += len(line) + 1
        record = decode(line)
        if record is None:
            damaged += 1
            continue
        records.append(record)
        end, damaged_before_end = offset, damaged
    return records, end, damaged_before_end


def read_records(directory: Path) -> dict[str, list[dict]]:
    """Rows by item key over every shard of `directory`. A key recorded twice (never written so,
    but shards copied by hand could be) keeps its first record, with a warning."""
    found: dict[str, list[dict]] = {}
    duplicates = damaged = 0
    for path in shard_files(directory):
        records, _, bad = read_shard(path)
        damaged += bad
        for key, rows in records:
            if key in found:
                duplicates += 1
            else:
                found[key] = rows
    if duplicates:
        warnings.warn(f"{directory}: {duplicates} items are recorded more than once; the first record of each is used")
    if damaged:
        warnings.warn(f"{directory}: {damaged} damaged lines between intact records were skipped; their items are computed again")
    return found


class Shard:
    """This process's shard file: locked for the whole launch (a second launch into the same
    run directory stops at once instead of mixing its rows in), appended to record by record."""

    def __init__(self, directory: Path, index: int) -> None:
        self.path = Path(directory) / shard_name(index)
        self._lock = FileLock(str(Path(directory) / f".{shard_name(index)}.lock"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[Shard]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunBusy(f"{self.path} is being written by another process: is this run already going?") from None
        try:
            yield self
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def appending(self) -> Iterator[ShardWriter]:
        new = not self.path.exists()
        _, end, _ = read_shard(self.path)
        with open(self.path, "ab") as file:
            file.truncate(end)  # a torn last line would swallow the next record
            if new:
                fsync_directory(self.path.parent)
            yield ShardWriter(file)


class ShardWriter:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def append(self, key: str, rows: list[dict]) -> None:
        self.file.write(encode(key, rows))
        self.file.flush()
        os.fsync(self.file.fileno())

