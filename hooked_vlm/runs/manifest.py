"""The run manifest (`manifest.json`): what made the rows of a run directory.

Compared on every launch (a difference is an error naming it): `experiment`, `arguments` (what
the caller was asked: the command line), `settings` (the experiment's resolved settings, defaults
included), `model` (name or path, checkpoint format, dtype, architecture, image preprocessing)
and `items` (how many, and a hash of their keys: the dataset's samples under every condition).
Recorded, not compared: `launches`, one entry per launch (time, processes = shard count, items
left, code version: package version and git commit), so that a run resumed on another machine,
with another batch size or after a bug fix says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = 1
COMPARED = ("format", "experiment", "arguments", "settings", "model", "items")


def describe(value: Any) -> Any:
    """A JSON description of a setting: plain values as they are; tensors and arrays by shape,
    dtype and a hash of their bytes; dataclasses field by field; functions by qualified name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return {"tensor": list(value.shape), "dtype": describe(value.dtype), "sha256": digest}
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return {"array": list(value.shape), "dtype": str(value.dtype), "sha256": digest}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    raise TypeError(f"cannot describe a {type(value).__name__} ({value!r}) in a run manifest")


def describe_ids(ids: Sequence[str]) -> dict[str, Any]:
    """A list of keys or sample ids, by count and hash (order included)."""
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


def model_identity(model, name_or_path: str | None = None) -> dict[str, Any]:
    identity = {"name_or_path": name_or_path} if name_or_path is not None else {}
    return identity | {
        "family": model.cfg.family,
        "checkpoint_format": model.cfg.checkpoint_format,
        "dtype": describe(model.dtype),
        "config": describe(model.cfg),
        "preprocessing": describe(getattr(model, "preprocessing", None)),
    }


def code_version() -> dict[str, Any]:
    """The package version, and the git commit (with a dirty flag) when the package is imported
    from a checkout of its own repository."""
    import hooked_vlm

    try:
        version = importlib.metadata.version("hooked_vlm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    package = Path(hooked_vlm.__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    if top is None or Path(top, "hooked_vlm", "__init__.py").resolve() != package / "__init__.py":
        return {"hooked_vlm": version, "git_commit": None}  # installed, or inside some other repository
    dirty = _git(package, "status", "--porcelain", "--untracked-files=no")
    return {"hooked_vlm": version, "git_commit": _git(package, "rev-parse", "HEAD"), "git_dirty": bool(dirty)}


def _git(directory: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def launch_record(processes: int, items_left: int, launch: dict[str, Any]) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"started": now, "processes": processes, "items_left": items_left, "code": code_version(), **describe(launch)}


# ---------------------------------------------------------------------------------- comparing
def normalised(value: Any) -> Any:
    """`value` as it reads back from the manifest (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def differences(recorded: dict[str, Any], current: dict[str, Any], sections: Sequence[str] = COMPARED) -> list[str]:
    """One line per differing leaf of the compared sections: "section.name: recorded ... now ..."."""
    lines: list[str] = []
    for section in sections:
        _diff(section, recorded.get(section), normalised(current.get(section)), lines)
    return lines


def _diff(path: str, old: Any, new: Any, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            _diff(f"{path}.{key}", old.get(key, "(absent)"), new.get(key, "(absent)"), lines)
    elif json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):  # NaN equals NaN here
        lines.append(f"{path}: {_short(old)} recorded, {_short(new)} now")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
