"""Reading checkpoints lazily and writing them into a model built on the meta device.

A `CheckpointReader` knows every tensor's name and shape from the shard headers/indices and
reads one tensor at a time (safetensors via `safe_open`, `.bin` via `torch.load(mmap=True,
weights_only=True)`), so a 13B checkpoint never needs two copies in memory. A conversion is a
`Plan`: for every parameter of the hooked model, which checkpoint tensor (and which rows of it)
fills it. Plans are checked before anything is read: keys no rule claims, parameters no key fills
and shape mismatches all raise one error that lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists every offending key."""


class CheckpointReader:
    """Name -> tensor access over the weight files of one directory (or a list of files)."""

    def __init__(self, files: Iterable[Path]):
        self.files = sorted(Path(f) for f in files)
        if not self.files:
            raise FileNotFoundError("no weight files (*.safetensors or *.bin) found")
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            for key, shape in _list_tensors(path):
                if key in self._file_of:
                    raise ConversionError(f"tensor {key!r} appears in both {self._file_of[key].name} and {path.name}")
                self._file_of[key], self._shapes[key] = path, shape
        self._open_path: Path | None = None
        self._open: object | None = None

    @classmethod
    def from_directory(cls, directory: Path, prefer: str = "safetensors") -> CheckpointReader:
        """All weight shards of a directory; safetensors when both formats are present."""
        directory = Path(directory)
        order = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
        for index_name in order if prefer == "safetensors" else order[::-1]:
            index = read_json(directory / index_name)
            if index is not None:  # an index names exactly the model's shards (LLaVA also ships mm_projector.bin)
                return cls(directory / name for name in sorted(set(index["weight_map"].values())))
        safetensors = list(directory.glob("*.safetensors"))
        bins = [p for p in directory.glob("*.bin") if p.name not in ("training_args.bin", "mm_projector.bin")]
        files = safetensors if (safetensors and (prefer == "safetensors" or not bins)) else bins
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        path = self._file_of[key]
        if path != self._open_path:  # keep at most one shard open
            self._open, self._open_path = _open(path), path
        if path.suffix == ".safetensors":
            return self._open.get_tensor(key)
        return self._open[key]


def _list_tensors(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    if path.suffix == ".safetensors":
        with _open(path) as f:
            return [(k, tuple(f.get_slice(k).get_shape())) for k in f.keys()]
    state = _open(path)
    return [(k, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)]


def _open(path: Path):
    """A safetensors handle or a (memory-mapped) `.bin` state dict; a file that cannot be parsed
    raises a `ConversionError` naming it, so a bad shard of a sharded checkpoint is found at once."""
    try:
        if path.suffix == ".safetensors":
            return safe_open(path, framework="pt")
        try:  # zip-format .bin files can be memory-mapped: nothing is read until a tensor is used
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, OSError):  # legacy (pre-1.6) serialisation cannot be mapped; read it whole
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # SafetensorError, a truncated zip, a broken pickle
        raise ConversionError(f"cannot read weight file {path} (corrupt, truncated or not a state dict): {type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class Assignment:
    """Fill hooked parameter `target` with checkpoint tensor `source` (optionally a row range).

    `part=(i, k, n)` fills only a part of `target`: chunk k of n, split along the rows, of
    `target[i]`. Per-expert checkpoint tensors are so stacked into one `[expert, ...]` parameter
    (expert e's gate into `(e, 0, 2)`, its up into `(e, 1, 2)`), without a second copy of it."""

    target: str
    source: str
    rows: tuple[int, int] | None = None
    reader: str = "main"  # which reader holds `source` (original LLaVA keeps CLIP apart)
    part: tuple[int, int, int] | None = None


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys known to be unused
    unknown: list[str] = field(default_factory=list)  # checkpoint keys no rule claims


def check_plan(plan: Plan, model: nn.Module, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Raise one `ConversionError` listing unknown keys, unfilled or doubly filled parameters,
    and shape mismatches between config and weights."""
    params = dict(model.named_parameters())
    problems = []
    if plan.unknown:
        problems.append(f"{len(plan.unknown)} checkpoint keys not used by any rule: {_listing(plan.unknown)}")
    targets = [a.target for a in plan.assignments]
    missing = sorted(set(params) - set(targets))
    if missing:
        problems.append(f"{len(missing)} model parameters missing from the checkpoint: {_listing(missing)}")
    extra = sorted({t for t in targets if t not in params})
    if extra:
        problems.append(f"{len(extra)} converted names the model does not have: {_listing(extra)}")
    whole = [a.target for a in plan.assignments if a.part is None]
    doubled = sorted({t for t in whole if whole.count(t) > 1} | _badly_stacked(plan, params))
    if doubled:
        problems.append(f"parameters filled twice or only in part: {_listing(doubled)}")
    mismatched = []
    for a in plan.assignments:
        if a.target not in params:
            continue
        source_shape = shapes[a.reader][a.source]
        if a.rows is not None:
            source_shape = (a.rows[1] - a.rows[0], *source_shape[1:])
        expected = tuple(params[a.target].shape) if a.part is None else _part_shape(params[a.target].shape, a.part)
        if _squeeze(source_shape) != _squeeze(expected):
            mismatched.append(f"{a.source}{'' if a.rows is None else list(a.rows)} {tuple(source_shape)} -> {a.target} {expected}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches between config and weights: {_listing(mismatched)}")
    if problems:
        raise ConversionError("checkpoint does not match the model:\n- " + "\n- ".join(problems))


def _part_shape(shape: torch.Size, part: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of chunk k of n (rows) of `target[i]`; `()` when the target cannot be so split."""
    i, k, n = part
    if len(shape) < 2 or not 0 <= i < shape[0] or not 0 <= k < n or shape[1] % n:
        return ()
    return (shape[1] // n, *shape[2:])


def _badly_stacked(plan: Plan, params: dict[str, nn.Parameter]) -> set[str]:
    """Targets filled by parts that do not cover them exactly once (or also as a whole)."""
    parts: dict[str, list[tuple[int, int, int]]] = {}
    for a in plan.assignments:
        if a.part is not None and a.target in params:
            parts.setdefault(a.target, []).append(a.part)
    whole = {a.target for a in plan.assignments if a.part is None}
    bad = set()
    for target, filled in parts.items():
        n = filled[0][2]
        expected = {(i, k, n) for i in range(params[target].shape[0]) for k in range(n)}
        if target in whole or len(filled) != len(set(filled)) or set(filled) != expected:
            bad.add(target)
    return bad


def load_plan(plan: Plan, model: nn.Module, readers: dict[str, CheckpointReader], dtype, placement: Callable[[str], torch.device]) -> None:
    """Read each tensor once, cast it and put it into the (meta-device) model, on the device
    `placement(name)` gives (see `weights_conversion.placement`)."""
    last: tuple[str, str, torch.Tensor] | None = None
    for a in plan.assignments:
        if last is not None and last[:2] == (a.reader, a.source):
            tensor = last[2]  # fused tensors (InternVL's qkv) feed several parameters
        else:
            tensor = readers[a.reader].get(a.source)
            last = (a.reader, a.source, tensor)
        if a.rows is not None:
            tensor = tensor[a.rows[0] : a.rows[1]]
        if a.part is not None:
            _fill_part(model, a.target, a.part, tensor, dtype, placement(a.target))
            continue
        # an independent copy: never a view into a memory-mapped shard; one tensor at a time
        _set_parameter(model, a.target, tensor.to(device=placement(a.target), dtype=dtype, copy=True))


def _squeeze(shape) -> tuple[int, ...]:
    """Drop leading singleton dims: InternViT stores its CLS token as [1, 1, D], CLIP as [D]."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.reshape(old.shape).contiguous(), requires_grad=False))


def _fill_part(model: nn.Module, name: str, part: tuple[int, int, int], tensor: torch.Tensor, dtype, device) -> None:
    """Copy `tensor` into its part of parameter `name`, allocating the parameter (still on the
    meta device) at its first part: the stacked parameter exists once, filled in place."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    param = getattr(module, attr)
    if param.is_meta:
        param = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
        setattr(module, attr, param)
    i, k, n = part
    rows = param.shape[1] // n
    with torch.no_grad():
        param[i, k * rows : (k + 1) * rows].copy_(tensor.reshape(rows, *param.shape[2:]))


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def image_processor_config(directory: Path) -> dict | None:
    """`preprocessor_config.json`, or the image processor nested in `processor_config.json`
    (where transformers 5.x saves it); None when the directory has neither."""
    config = read_json(directory / "preprocessor_config.json")
    if config is None:
        config = (read_json(directory / "processor_config.json") or {}).get("image_processor")
    return config


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer, from its tokenizer files alone. Passing a blank config keeps
    `AutoTokenizer` from reading config.json: an original InternVL's `auto_map` would ask to run
    the remote code, an original LLaVA's 4.31 Llama fields would be read as a `LlavaConfig`."""
    from transformers import AutoTokenizer, PreTrainedConfig

    return AutoTokenizer.from_pretrained(directory, config=PreTrainedConfig())


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
