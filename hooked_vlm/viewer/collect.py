"""What the viewer shows, read in one forward pass over prompt + answer.

Hooks slice every tensor as it passes, so only what the page needs is ever kept:

- language model: `blocks.{l}.attn.hook_pattern` rows of the selectable query tokens, columns of
  the image tokens only (`[layer, head, query, image_token]`);
- vision tower: `vision.blocks.{l}.attn.hook_pattern` pooled to image-token cells (InternVL's
  pixel shuffle merges 2x2 patches into one token: a cell's row is the mean of its patches'
  rows, a key cell sums its patches' columns), within each view (`[layer, head, cell, cell]`);
- logit lens: `blocks.{l}.hook_resid_post` at the image tokens, through `ln_final` and the
  unembedding, top-k per token.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vlm.interventions._common import check_layers
from hooked_vlm.inputs import VLMInput

VISION_HEADS = ("mean", "all")
LENS_CHUNK = 256  # image tokens unembedded at once: 256 x 152k vocab x 4 bytes = 150 MB


@dataclass(frozen=True)
class Selection:
    """What to keep, checked against the model: layers of each tower, query positions, heads."""

    layers: list[int]
    queries: Int[Tensor, "query"]
    vision_layers: list[int]
    vision_heads: str
    lens_layers: list[int]
    lens_top_k: int


def extend_with_answer(inputs: VLMInput, tokens: Int[Tensor, "1 new"]) -> VLMInput:
    """`inputs` followed by generated tokens (positions continue; `answer_mask` marks them), so
    one forward reads the attention of every prompt and answer token."""
    n = tokens.shape[1]
    device = inputs.input_ids.device
    answer = torch.zeros(1, inputs.input_ids.shape[1] + n, dtype=torch.bool, device=device)
    answer[:, -n:] = True
    return replace(
        inputs,
        input_ids=torch.cat([inputs.input_ids, tokens.to(device)], dim=1),
        attention_mask=torch.cat([inputs.attention_mask, torch.ones_like(tokens, device=device)], dim=1),
        position_ids=torch.cat([inputs.position_ids, inputs.position_ids[:, -1:] + torch.arange(1, n + 1, device=device)], dim=1),
        answer_mask=answer,
    )


def default_queries(inputs: VLMInput) -> Int[Tensor, "query"]:
    """Every real (not padding) text token after the first image token: the prompt's tail and
    the answer. Tokens before the image cannot attend to it (causal mask)."""
    image = inputs.image_token_mask()[0].cpu()
    real = inputs.attention_mask[0].bool().cpu()
    after = torch.arange(len(image)) > int(inputs.layout.position.min())
    return torch.nonzero(after & real & ~image).flatten()


def select(
    model,
    inputs: VLMInput,
    n_new: int,
    *,
    layers: Sequence[int] | None,
    queries: Sequence[int] | None,
    vision_layers: Sequence[int] | None,
    vision_heads: str,
    lens_layers: Sequence[int] | None,
    lens_top_k: int,
) -> Selection:
    """Check the choices against the model and the prompt; `None` picks the defaults (every LM
    layer, the text tokens after the image, four vision layers evenly spaced up to the last one
    the projector reads, every LM layer for the lens)."""
    n_vision = len(model.vision.blocks)
    if vision_layers is None:
        vision_layers = sorted({int(round(x)) for x in np.linspace(0, n_vision - 1, min(4, n_vision))})
    if vision_heads not in VISION_HEADS:
        raise ValueError(f"vision_heads must be one of {VISION_HEADS}, got {vision_heads!r}")
    if not 1 <= lens_top_k <= model.cfg.text.d_vocab:
        raise ValueError(f"lens_top_k must be between 1 and the vocabulary size {model.cfg.text.d_vocab}, got {lens_top_k}")
    n_pos = inputs.input_ids.shape[1] + n_new
    if queries is None:
        chosen = torch.cat([default_queries(inputs), torch.arange(inputs.input_ids.shape[1], n_pos)])
    else:
        chosen = torch.as_tensor(list(queries), dtype=torch.long).flatten()
        bad = chosen[(chosen < 0) | (chosen >= n_pos)]
        if len(bad):
            raise IndexError(f"query positions {bad.tolist()} out of range: the sequence has {n_pos} positions")
        chosen = chosen.unique()
    if not len(chosen):
        raise ValueError("no query token to show: the prompt has no text after the image (generate an answer: max_new_tokens)")
    return Selection(
        layers=check_layers(model.cfg.text.n_layers, layers),
        queries=chosen,
        vision_layers=check_layers(n_vision, vision_layers, "vision tower (blocks the projector reads)"),
        vision_heads=vision_heads,
        lens_layers=check_layers(model.cfg.text.n_layers, lens_layers),
        lens_top_k=lens_top_k,
    )


def stored_bytes(model, inputs: VLMInput, selection: Selection) -> int:
    """Bytes the page holds (before compression): one byte per attention weight and per lens
    probability, four per lens token id."""
    n_image = len(inputs.layout)
    n_grid = int((inputs.layout.row >= 0).sum())
    cells = max(g.rows * g.cols for g in inputs.layout.views[0])
    vision_heads = 1 if selection.vision_heads == "mean" else model.cfg.vision.n_heads
    lm = len(selection.layers) * model.cfg.text.n_heads * len(selection.queries) * n_image
    vision = len(selection.vision_layers) * vision_heads * n_grid * cells
    lens = len(selection.lens_layers) * n_image * selection.lens_top_k * 5
    return lm + vision + lens


def fit_to_budget(model, inputs: VLMInput, selection: Selection, max_bytes: float, layers_chosen: bool) -> Selection:
    """The selection if it fits in `max_bytes`; else, when the language-model layers were left
    to the default, as many of them as fit, evenly spaced and always with the last (a warning
    says which); else a ValueError naming the knobs."""
    size = stored_bytes(model, inputs, selection)
    if size <= max_bytes:
        return selection
    per_layer = model.cfg.text.n_heads * len(selection.queries) * len(inputs.layout)
    others = size - per_layer * len(selection.layers)
    n_fit = int((max_bytes - others) // per_layer)
    if layers_chosen or n_fit < 1:
        raise ValueError(
            f"the view would hold {size / 2**20:.0f} MB of attention (limit max_megabytes={max_bytes / 2**20:g}): keep "
            "fewer language-model layers (layers=...) or query tokens (queries=..., max_new_tokens), fewer vision "
            "layers (vision_layers=...) or vision_heads='mean', or raise max_megabytes"
        )
    n_layers = model.cfg.text.n_layers
    layers = sorted({int(round(x)) for x in np.linspace(n_layers - 1, 0, n_fit)})
    warnings.warn(
        f"kept {len(layers)} of {n_layers} language-model layers ({layers}) to stay under max_megabytes="
        f"{max_bytes / 2**20:g}; pass layers=... (and a larger max_megabytes) for others",
        stacklevel=3,
    )
    return replace(selection, layers=layers)


@torch.no_grad()
def read_activations(model, inputs: VLMInput, selection: Selection) -> dict[str, np.ndarray]:
    """One forward with slicing hooks; returns float32 arrays `lm_attention`
    `[layer, head, query, image_token]`, `vision_attention` `[layer, head, cell, cell]` (head
    axis of length 1 for "mean") and lens `lens_ids`/`lens_probs` `[layer, image_token, k]`."""
    layout = inputs.layout
    keys = layout.position
    merge = round(1 / model.cfg.downsample_ratio) if model.cfg.downsample_ratio else 1
    grid = layout.row >= 0
    cells = _cells_by_view(layout.vision_positions(merge), layout.view, grid)
    lm, vision, resid = {}, {}, {}

    def lm_hook(pattern: Float[Tensor, "batch head query key"], hook, layer: int) -> None:
        rows = pattern[0][:, selection.queries.to(pattern.device)]
        lm[layer] = rows[:, :, keys.to(pattern.device)].float().cpu()

    def vision_hook(pattern: Float[Tensor, "view head query key"], hook, layer: int) -> None:
        pooled = torch.cat([_pool_view(pattern[v], patches.to(pattern.device)) for v, patches in cells], dim=1)
        vision[layer] = pooled.mean(0, keepdim=True) if selection.vision_heads == "mean" else pooled

    def resid_hook(x: Float[Tensor, "batch pos d_model"], hook, layer: int) -> None:
        resid[layer] = x[0, keys.to(x.device)]

    hooks = [(f"blocks.{l}.attn.hook_pattern", partial(lm_hook, layer=l)) for l in selection.layers]
    hooks += [(f"vision.blocks.{l}.attn.hook_pattern", partial(vision_hook, layer=l)) for l in selection.vision_layers]
    hooks += [(f"blocks.{l}.hook_resid_post", partial(resid_hook, layer=l)) for l in selection.lens_layers]
    model.run_with_hooks(inputs, fwd_hooks=hooks)
    ids, probs = zip(*(_logit_lens(model, resid[l], selection.lens_top_k) for l in selection.lens_layers))
    return {
        "lm_attention": torch.stack([lm[l] for l in selection.layers]).numpy(),
        "vision_attention": torch.stack([vision[l] for l in selection.vision_layers]).numpy(),
        "lens_ids": torch.stack(ids).numpy(),
        "lens_probs": torch.stack(probs).numpy(),
    }


def _cells_by_view(
    vision_positions: Int[Tensor, "n merged"], view: Int[Tensor, "n"], grid: Tensor
) -> list[tuple[int, Int[Tensor, "cell merged"]]]:
    """For each view, the tower positions of its grid cells in row-major order (the layout lists
    a view's cells so; CLS image tokens are not cells)."""
    return [(int(v), vision_positions[grid & (view == v)]) for v in view[grid].unique()]


def _pool_view(pattern: Float[Tensor, "head seq seq"], patches: Int[Tensor, "cell merged"]) -> Float[Tensor, "head cell cell"]:
    """Attention between the image-token cells of one view: a cell attends as the mean of its
    patches' rows, and is attended as the sum of its patches' columns (so a row of cells sums to
    the share of attention on patches, the rest going to CLS)."""
    n_cells, merged = patches.shape
    rows = pattern[:, patches.flatten()].float().unflatten(1, (n_cells, merged)).mean(2)
    return rows[:, :, patches.flatten()].unflatten(2, (n_cells, merged)).sum(-1).cpu()


def _logit_lens(model, resid: Float[Tensor, "token d_model"], k: int) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """Top-k next-token predictions read off an intermediate residual stream (final norm, then
    the unembedding; softmax in fp32), a chunk of tokens at a time to bound memory."""
    ids, probs = [], []
    for chunk in resid.split(LENS_CHUNK):
        logits = model.unembed(model.ln_final(chunk.to(model.ln_final.weight.device)))
        top = logits.float().softmax(-1).topk(k, dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.cat(ids), torch.cat(probs)
