"""The run manifest (`manifest.json`): what made the rows of a run directory.

Compared on every launch (a difference is an error naming it): `experiment`, `arguments` (what
the caller was asked: the command line), `settings` (the experiment's resolved settings, defaults
included), `model` (`hooked_vlm.provenance.model_identity`: name or path, checkpoint format,
dtype, architecture, weights sample, image preprocessing and prompt settings) and `items` (how
many, and a hash of their keys: the dataset's samples under every condition). Their hash is the
run's `tag` (`run_tag`), which every record of its shard files carries: a shard copied in from a
run made otherwise is refused, never merged. Recorded, not compared: `launches`, one entry per launch (time, processes = shard count, items
left, code version: package version and git commit), so that a run resumed on another machine,
with another batch size or after a bug fix says so.
"""

from __future__ import annotations

import dataclasses
import contextvars
import datetime
import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = 2  # 2: every record carries its run's tag; settings hold the experiment's data
COMPARED = ("format", "experiment", "arguments", "settings", "model", "items")
# keys that say when a setting was made, not what it is: left out of its description (each process
# of a launch computes a fallback mean embedding itself, a second apart on a loaded machine)
WHEN = frozenset({"created"})


class RunMismatch(ValueError):
    """The run directory was made by another command (or holds results nothing says how were made)."""


def describe(value: Any) -> Any:
    """A JSON description of a setting: plain values as they are; tensors and arrays by shape,
    dtype and a hash of their bytes; dataclasses field by field; functions by qualified name, and
    with the values they captured (see `_describe_function`); dicts without their `WHEN` keys
    (a mean embedding's creation time is not what it is)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items() if k not in WHEN}
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
        return _describe_function(value)
    raise TypeError(f"cannot describe a {type(value).__name__} ({value!r}) in a run manifest")


def _describe_function(fn: Any) -> Any:
    """A function by its qualified name; one made by a factory (`make(0.5)` and `make(1.0)` share
    a name) also by the values it captured and its defaults, so that a resume with another is
    refused; a captured value that cannot be described (a model) by its type. (Its code is not
    compared: an edited function body goes unnoticed.) A `functools.partial` by its function and
    arguments."""
    if isinstance(fn, functools.partial):
        return {"partial": _describe_function(fn.func), "args": _described(fn.args), "keywords": _described(fn.keywords)}
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    captured = [cell.cell_contents for cell in getattr(fn, "__closure__", None) or () if _filled(cell)]
    defaults = [*(getattr(fn, "__defaults__", None) or ()), *(getattr(fn, "__kwdefaults__", None) or {}).items()]
    if (not captured and not defaults) or id(fn) in _describing.get():  # a recursive function names itself
        return name
    token = _describing.set(_describing.get() | {id(fn)})
    try:
        return {"function": name, "captured": _described(captured), "defaults": _described(defaults)}
    finally:
        _describing.reset(token)


_describing: contextvars.ContextVar[frozenset] = contextvars.ContextVar("hooked_vlm_describing", default=frozenset())


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a variable not yet bound
        return False
    return True


def _described(value: Any) -> Any:
    try:
        return describe(value)
    except TypeError:
        return [_described(v) for v in value] if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def describe_ids(ids: Sequence[str]) -> dict[str, Any]:
    """A list of keys or sample ids, by count and hash (order included)."""
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


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


def run_tag(identity: dict[str, Any]) -> str:
    """The hash of a run's compared sections: the same for every launch of the same command."""
    text = json.dumps({section: normalised(identity.get(section)) for section in COMPARED}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        for key in [k for k in old if k not in WHEN] + [k for k in new if k not in old and k not in WHEN]:
            _diff(f"{path}.{key}", old.get(key, "(absent)"), new.get(key, "(absent)"), lines)
    elif json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):  # NaN equals NaN here
        lines.append(f"{path}: {_short(old)} recorded, {_short(new)} now")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
