"""Attention knockout: forbid attention from a source token set to a target token set (§1.8).

The blocked scores are set to the dtype's minimum at `attn.hook_attn_scores` — before the
softmax and after the causal/padding mask, exactly what adding an extra additive mask of
`finfo.min` does — in chosen layers and query heads. Attaching to the scores makes the layer
materialise its pattern (eager attention); other layers keep the fused kernel.

- Language model (`TokenSet`s): queries are the positions of the hook call (`model.past_length`
  onwards on decoding steps, so a source with `include_generated` blocks every generated token),
  keys are every cached position.
- Vision tower (`PatchSet`s, e.g. `vision_patches(model, inputs, object_tokens(...))`): within
  each view, from source patches to target patches.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vlm.interventions._common import Hooks, batch_rows, check_heads, check_layers
from hooked_vlm.interventions.tokens import PatchSet, TokenSet


def attention_knockout(
    model,
    source: TokenSet | PatchSet,
    target: TokenSet | PatchSet,
    *,
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
) -> Hooks:
    """Block attention from `source` (queries) to `target` (keys) in `layers` (default: all)
    and `heads` (query heads; default: all). Two `TokenSet`s address the language model, two
    `PatchSet`s the vision tower."""
    if isinstance(source, TokenSet) and isinstance(target, TokenSet):
        cfg, prefix, tower = model.cfg.text, "blocks", "language model"
    elif isinstance(source, PatchSet) and isinstance(target, PatchSet):
        cfg, prefix, tower = model.cfg.vision, "vision.blocks", "vision tower"
        if source.mask.shape != target.mask.shape:
            shapes = f"{tuple(source.mask.shape)} vs {tuple(target.mask.shape)}"
            raise ValueError(f"source and target patch sets differ in shape: {shapes}")
    else:
        raise TypeError(
            f"source and target must both be TokenSets (language model) or both PatchSets (vision tower), "
            f"got {type(source).__name__} and {type(target).__name__}"
        )
    layers = check_layers(cfg.n_layers, layers, tower)
    heads = check_heads(cfg.n_heads, heads, f"the {tower}")
    block = _lm_blocked if isinstance(source, TokenSet) else _vision_blocked

    def knock_out(scores: Float[Tensor, "batch head query key"], hook) -> Tensor:
        blocked = block(source, target, scores, hook.name)
        if heads is not None:
            head_mask = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            head_mask[heads] = True
            blocked = blocked & head_mask[None, :, None, None]
        return scores.masked_fill(blocked, torch.finfo(scores.dtype).min)

    return [(f"{prefix}.{layer}.attn.hook_attn_scores", knock_out) for layer in layers]


def _lm_blocked(
    source: TokenSet, target: TokenSet, scores: Tensor, name: str
) -> Bool[Tensor, "batch 1 query key"]:
    batch, _, n_query, n_key = scores.shape
    start = n_key - n_query  # queries are the last positions: the keys include the KV cache
    queries = batch_rows(source.window(start, n_query, scores.device), batch, "the source set", name)
    keys = batch_rows(target.window(0, n_key, scores.device), batch, "the target set", name)
    return (queries[:, :, None] & keys[:, None, :])[:, None]


def _vision_blocked(
    source: PatchSet, target: PatchSet, scores: Tensor, name: str
) -> Bool[Tensor, "view 1 query key"]:
    if source.mask.shape != (scores.shape[0], scores.shape[2]):
        raise ValueError(
            f"the patch sets cover {tuple(source.mask.shape)} (view, position) but {name} runs on "
            f"{scores.shape[0]} views of {scores.shape[2]} positions"
        )
    queries, keys = source.mask.to(scores.device), target.mask.to(scores.device)
    return (queries[:, :, None] & keys[:, None, :])[:, None]
