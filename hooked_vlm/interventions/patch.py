"""Activation patching: write a source run's activations into a base run (§1.9).

Any hook; optionally only some positions (a `TokenSet` for the language model, a `PatchSet` for
the vision tower) and some query heads (`hook_q`, `hook_z`, `hook_result`, scores and pattern).
The source is a `VLMInput` (run once here) or an `ActivationCache` from `run_with_cache`. Source
and base must share their token layout, or positions would not correspond.

For a sweep over every head, `hooked_vlm.patching.head_patching_sweep` reuses the shared prefix;
these builders are the general, composable form (and its reference).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import (
    Axes,
    Hooks,
    axes_of,
    batch_rows,
    check_heads,
    check_hook_name,
    group_heads,
)
from hooked_vlm.interventions.tokens import PatchSet, TokenSet


def activation_patch(
    model,
    base: VLMInput,
    source: VLMInput | Mapping[str, Tensor],
    names: str | Sequence[str],
    *,
    positions: TokenSet | PatchSet | None = None,
    heads: Iterable[int] | int | None = None,
    source_inputs: VLMInput | None = None,
) -> Hooks:
    """Replace the base run's activation at each hook in `names` by the source's, at
    `positions` (default: all) and query `heads` (default: all; only for hooks with query heads —
    key/value hooks hold KV heads, which GQA shares between query heads).

    `source` is a `VLMInput` (its activations are computed now, under whatever hooks are
    attached at that moment) or a cache holding `names` (pass `source_inputs` to have its layout
    checked). On decoding steps of `generate`, positions
    past the source's sequence are left alone.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_hook_name(model, name)
    if isinstance(source, VLMInput):
        source_inputs = source
        _check_same_layout(base, source_inputs)
        with torch.no_grad():
            _, source = model.run_with_cache(source_inputs, names_filter=lambda n: n in names, return_cache_object=False)
    elif source_inputs is not None:
        _check_same_layout(base, source_inputs)
    missing = [name for name in names if name not in source]
    if missing:
        raise KeyError(f"the source cache holds no {missing}; cache them with names_filter")
    hooks = []
    for name in names:
        axes = axes_of(name)
        _check_positions(positions, axes, name)
        head_index = None
        if heads is not None:
            if axes.head is None or axes.kv_heads:
                raise ValueError(f"{name} has no query-head axis; patch heads at attn.hook_q, hook_z, hook_result or the pattern")
            cfg = model.cfg.vision if axes.tower == "vision" else model.cfg.text
            head_index = check_heads(cfg.n_heads, heads, name)
        hooks.append((name, _patch_hook(model, source[name], axes, positions, head_index)))
    return hooks


def head_patch(
    model,
    base: VLMInput,
    source: VLMInput | Mapping[str, Tensor],
    heads: Iterable[tuple[int, int]],
    *,
    positions: TokenSet | None = None,
    hook: str = "hook_z",
    source_inputs: VLMInput | None = None,
) -> Hooks:
    """Patch language-model query heads given as (layer, head) pairs at `attn.{hook}`
    (`hook_z`, the head's slice of the `o_proj` input, is what the paper patches)."""
    by_layer = group_heads(model, heads)
    names = [f"blocks.{layer}.attn.{hook}" for layer in by_layer]
    if isinstance(source, VLMInput):
        _check_same_layout(base, source)
        with torch.no_grad():
            _, cache = model.run_with_cache(source, names_filter=lambda n: n in names, return_cache_object=False)
        source_inputs, source = source, cache
    hooks: Hooks = []
    for layer, layer_heads in by_layer.items():
        name = f"blocks.{layer}.attn.{hook}"
        hooks += activation_patch(model, base, source, name, positions=positions, heads=layer_heads, source_inputs=source_inputs)
    return hooks


def _check_same_layout(base: VLMInput, source: VLMInput) -> None:
    if base.input_ids.shape != source.input_ids.shape:
        raise ValueError(f"source and base differ in shape: {tuple(source.input_ids.shape)} vs {tuple(base.input_ids.shape)}")
    if not base.layout.same_geometry(source.layout):
        raise ValueError("source and base have different image-token layouts (views, positions): tokens would not correspond")


def _check_positions(positions, axes: Axes, name: str) -> None:
    if positions is None:
        return
    if axes.tower == "language" and not isinstance(positions, TokenSet):
        raise TypeError(f"{name} is a language-model hook: give positions as a TokenSet")
    if axes.tower == "vision" and not isinstance(positions, PatchSet):
        raise TypeError(f"{name} is a vision-tower hook: give positions as a PatchSet")
    if axes.tower == "projector":
        raise ValueError(f"{name}: positions are not supported on projector hooks (patch whole views)")
    if isinstance(positions, TokenSet) and positions.include_generated:
        raise ValueError("a source run has no generated tokens to patch from (include_generated=True)")


def _patch_hook(model, cached: Tensor, axes: Axes, positions, head_index: list[int] | None):

    def patch(activation: Tensor, hook) -> Tensor:
        if isinstance(positions, PatchSet):
            start, n = 0, activation.shape[axes.position]
        else:
            start, n = model.past_length, activation.shape[axes.position]
        available = cached.shape[axes.position] - start
        if available <= 0:
            return activation  # a decoding step past the source's sequence
        source = cached.narrow(axes.position, start, min(n, available))
        if axes.has_key_axis and source.shape[-1] != activation.shape[-1]:
            return activation  # scores of a decoding step: keys beyond the source's
        if n > available:  # a no-cache forward over prompt + generated tokens: patch the prompt part
            activation_part = activation.narrow(axes.position, 0, available)
            patched = _patched(activation_part, source, axes, positions, head_index, start, hook.name)
            return torch.cat([patched, activation.narrow(axes.position, available, n - available)], dim=axes.position)
        return _patched(activation, source, axes, positions, head_index, start, hook.name)

    return patch


def _patched(activation: Tensor, source: Tensor, axes: Axes, positions, head_index, start: int, name: str) -> Tensor:
    if source.shape[1:] != activation.shape[1:] or source.shape[0] not in (1, activation.shape[0]):
        raise ValueError(f"{name}: the source activation has shape {tuple(source.shape)}, the base {tuple(activation.shape)}")
    mask = _where(activation, axes, positions, head_index, start, name)
    return torch.where(mask, source.to(activation), activation)


def _where(activation: Tensor, axes: Axes, positions, head_index, start: int, name: str) -> Bool[Tensor, "..."]:
    """A mask broadcastable to `activation`: True where the source is written."""
    shape = [1] * activation.ndim
    mask = torch.ones(shape, dtype=torch.bool, device=activation.device)
    if positions is not None:
        n = activation.shape[axes.position]
        if isinstance(positions, PatchSet):
            rows = positions.mask.to(activation.device)
            if rows.shape != (activation.shape[0], n):
                shapes = f"{tuple(rows.shape)} (view, position) but {name} is {tuple(activation.shape)}"
                raise ValueError(f"the patch set covers {shapes}")
        else:
            rows = batch_rows(positions.window(start, n, activation.device), activation.shape[0], "the position set", name)
        shape[0], shape[axes.position] = rows.shape
        mask = mask & rows.view(shape)
    if head_index is not None:
        heads = torch.zeros(activation.shape[axes.head], dtype=torch.bool, device=activation.device)
        heads[head_index] = True
        head_shape = [1] * activation.ndim
        head_shape[axes.head] = len(heads)
        mask = mask & heads.view(head_shape)
    return mask
