"""Plumbing shared by the hook builders: hook-name anatomy, layer and head checks. (A hook call's
positions start at `model.past_length`: 0 on a prefill, the cache length on a decoding step.)"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor

Hook = tuple[str, Callable[..., Any]]
Hooks = list[Hook]  # what every builder returns: `(hook_name, fn)` pairs for `fwd_hooks=`

_QUERY_HEAD_HOOKS = ("attn.hook_q", "attn.hook_rot_q", "attn.q_norm.hook_normalized", "attn.hook_z", "attn.hook_result")
_KV_HEAD_HOOKS = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.k_norm.hook_normalized")
_SCORE_HOOKS = ("attn.hook_attn_scores", "attn.hook_pattern")  # [batch, head, query_pos, key_pos]


@dataclass(frozen=True)
class Axes:
    """Where a hook's tensor keeps its positions and its heads (batch is axis 0 everywhere)."""

    tower: Literal["language", "vision", "projector"]
    position: int
    head: int | None = None
    kv_heads: bool = False  # the head axis counts key/value heads (GQA), not query heads
    has_key_axis: bool = False  # attention scores/pattern: the last axis covers every key


def axes_of(name: str) -> Axes:
    tower = "vision" if name.startswith("vision.") else "projector" if name.startswith("projector.") else "language"
    if name.endswith(_SCORE_HOOKS):
        return Axes(tower, position=2, head=1, has_key_axis=True)
    if name.endswith(_QUERY_HEAD_HOOKS):
        return Axes(tower, position=1, head=2)
    if name.endswith(_KV_HEAD_HOOKS):
        return Axes(tower, position=1, head=2, kv_heads=True)
    return Axes(tower, position=1)


def check_hook_name(model, name: str) -> str:
    if name not in model.hook_dict:
        close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
        raise ValueError(f"unknown hook name {name!r}" + (f"; did you mean {close}?" if close else ""))
    return name


def as_index(value: Any, what: str) -> int:
    """Any integer (Python, numpy, a one-element integer tensor) as an int; TypeError otherwise.
    Bools are refused: `True` as a layer is a slip, not layer 1."""
    if not isinstance(value, (bool, Tensor)) or (isinstance(value, Tensor) and value.dtype != torch.bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")


def _indices(values: Any, what: str) -> list[int]:
    """One integer or an iterable of integers (`what`: "layer", "head"), as a list of ints."""
    try:
        return [as_index(values, f"a {what}")]
    except TypeError:
        pass
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what}s must be an integer or an iterable of integers, got {values!r}")
    return [as_index(value, f"a {what}") for value in values]


def check_layers(n_layers: int, layers: Iterable[int] | int | None, tower: str = "language model") -> list[int]:
    """`None` means every layer. Negative indices are refused: they would hide off-by-one errors."""
    if layers is None:
        return list(range(n_layers))
    layers = _indices(layers, "layer")
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range: the {tower} has {n_layers} layers (0..{n_layers - 1})")
    return sorted(set(layers))


def check_heads(n_heads: int, heads: Iterable[int] | int | None, where: str) -> list[int] | None:
    """`None` means every head."""
    if heads is None:
        return None
    heads = _indices(heads, "head")
    for head in heads:
        if not 0 <= head < n_heads:
            raise IndexError(f"head {head} out of range: {where} has {n_heads} query heads (0..{n_heads - 1})")
    return sorted(set(heads))


def group_heads(model, heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, query head) pairs of the language model, checked, grouped by layer."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise TypeError(f"(layer, head) pairs expected, got {heads!r}")
    by_layer: dict[int, list[int]] = {}
    for pair in heads:
        try:
            layer, head = pair
        except (TypeError, ValueError):
            raise TypeError(f"(layer, head) pairs expected, got {pair!r} among the heads (one head is [(layer, head)])") from None
        (layer,) = check_layers(model.cfg.text.n_layers, as_index(layer, "a layer"))
        (head,) = check_heads(model.cfg.text.n_heads, as_index(head, "a head"), f"layer {layer}")
        by_layer.setdefault(layer, []).append(head)
    if not by_layer:
        raise ValueError("no heads given")
    return {layer: sorted(set(hs)) for layer, hs in sorted(by_layer.items())}


def batch_rows(mask: Tensor, batch: int, what: str, hook_name: str) -> Tensor:
    """`mask` `[rows, ...]` for a hook call of `batch` rows; a one-row mask serves every row
    (e.g. the copies of a batched head sweep)."""
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(batch, *mask.shape[1:])
    raise ValueError(f"{what} covers {mask.shape[0]} batch rows but {hook_name} runs on {batch}")


