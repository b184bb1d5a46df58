"""Head sweeps: the effect of patching each attention head from a source run into a base run.

Two methods, both over every language-model head at once:

- `head_patching_sweep` (exact). A patch at positions >= P cannot change anything before P, so
  the base run's image features and its key/values for positions < P are computed once; each
  patched run only recomputes positions P.. against that shared prefix, from the lowest layer
  it patches (the blocks below are the base run's), and many heads are patched side by side in
  one batch (copy i of the suffix patches head i). Identical to running one full patched
  forward per head (`naive_head_patching`), at a fraction of the cost.
- `head_attribution` (attribution patching, AtP): a first-order estimate of every head's effect,
  `(z_source - z_base) . dM/dz` at the base run, from one forward and one backward of the base
  and one forward of the source — for both towers' heads. With `node="pattern"` it attributes
  the heads' attention patterns instead, optionally with AtP*'s QK fix (`qk_fix=True`).
- `expert_attribution`: the same estimate for every expert of a mixture-of-experts language
  model (its weighted output), against a source run or against dropping the expert.

A metric maps the logits of positions `offset..` (`[batch, pos - offset, d_vocab]`) to one number
per batch row (e.g. the masked NLL of the answer tokens, `answer_nll_metric`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.components import KVCache
from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import as_index, group_heads
from hooked_vlm.metrics import TokenFilter, scored_tokens, token_nll

Metric = Callable[[Tensor, int], Tensor]  # (logits[:, offset:], offset) -> [batch]
Head = tuple[int, int]  # (layer, query head)


def answer_nll_metric(
    inputs: VLMInput,
    *,
    tokenizer: Any = None,
    token_filter: TokenFilter | str | None = None,
    token_mask: Tensor | None = None,
) -> Metric:
    """Mean teacher-forced NLL of the scored answer tokens (`hooked_vlm.metrics.scored_tokens`:
    `inputs.answer_mask`, optionally narrowed, e.g. `token_filter="digits"` for a box's
    coordinates; or exactly `token_mask`) as a sweep metric over the logits of positions `offset..`."""
    mask = scored_tokens(inputs, tokenizer, token_filter) if token_mask is None else token_mask.bool()

    def metric(logits: Tensor, offset: int) -> Tensor:
        if int(mask[:, : offset + 1].sum()):
            raise ValueError(f"scored tokens before position {offset + 1} are outside the patched suffix")
        ids = inputs.input_ids[:, offset:].to(logits.device).expand(len(logits), -1)
        nll = token_nll(logits, ids).double()  # float64 mean, as metrics.masked_nll
        selected = mask[:, offset:].to(logits.device).expand(len(logits), -1)
        return torch.where(selected, nll, 0.0).sum(-1) / selected.sum(-1).clamp(min=1)  # NaN at a scored token propagates

    return metric


def _check_pair(base: VLMInput, source: VLMInput) -> None:
    if len(base) != 1 or len(source) != 1:
        raise ValueError(f"head sweeps take one base and one source (batch 1), got {len(base)} and {len(source)}")
    if base.input_ids.shape != source.input_ids.shape or not base.layout.same_geometry(source.layout):
        raise ValueError("source and base have different token layouts: positions would not correspond")


def _all_heads(model) -> list[Head]:
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def _checked_heads(model, heads: Sequence[Head] | None) -> list[Head]:
    """Every head when None; else (layer, head) pairs of any integer type, checked, as ints."""
    if heads is None:
        return _all_heads(model)
    heads = list(heads)  # read once: a generator would be spent by the check
    group_heads(model, heads)  # raises on non-pairs, non-integers and indices out of range
    return [(as_index(layer, "a layer"), as_index(head, "a head")) for layer, head in heads]


def _source_z(model, source: VLMInput) -> dict[int, Tensor]:
    _, cache = model.run_with_cache(source, names_filter=lambda n: n.startswith("blocks.") and n.endswith("attn.hook_z"))
    return {layer: cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.cfg.n_layers)}


@torch.no_grad()
def head_patching_sweep(
    model,
    base: VLMInput,
    source: VLMInput,
    metric: Metric,
    positions: Sequence[int] | Tensor,
    *,
    heads: Sequence[Head] | None = None,
    batch_size: int = 16,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "layer head"]:
    """Metric of the base run with each head's `hook_z` at `positions` replaced by the source's.

    Returns `[n_layers, n_heads]` (NaN for heads not in `heads`). `fwd_hooks` stay attached to
    every run (e.g. an ablation that defines the base condition); they must not edit positions
    before `min(positions)` differently from the base run itself.
    """
    _check_pair(base, source)
    heads = _checked_heads(model, heads)
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    if len(positions) == 0:
        raise ValueError("no positions to patch")
    offset = int(positions.min())
    if offset == 0:
        raise ValueError("patching position 0 leaves no shared prefix; use naive_head_patching")
    out = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), dtype=torch.float64)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        source_z = _source_z(model, source)
        # the shared prefix: image features, merged embeddings, key/values of positions < offset
        features = model.encode_images(base.pixel_values)
        embeds = model.embed_inputs(base.input_ids, features, base.image_token_mask())
        prefix = KVCache(model.cfg.n_layers)
        model.run_language_model(embeds[:, :offset], base.attention_mask[:, :offset], base.position_ids[:, :offset], prefix)
        # the base suffix's residual stream entering each block: a patch in layer L leaves the
        # blocks before L as they were, so a batch starts at its lowest layer from here
        resid_pre = _suffix_resid_pre(model, embeds[:, offset:], base, offset, prefix)
        relative = positions - offset
        heads = sorted(heads)
        for start in range(0, len(heads), batch_size):
            chunk = heads[start : start + batch_size]
            n, first_layer = len(chunk), chunk[0][0]
            patch = _suffix_patch_hooks(chunk, source_z, positions, relative)
            with model.hooks(fwd_hooks=patch):
                logits = model.run_language_model(
                    resid_pre[first_layer].expand(n, -1, -1),
                    base.attention_mask.expand(n, -1),
                    base.position_ids[:, offset:].expand(n, -1),
                    prefix.frozen_copy(),
                    start_at_layer=first_layer,
                )
            values = metric(logits, offset)
            for (layer, head), value in zip(chunk, values):
                out[layer, head] = value.item()
    return out


def _suffix_resid_pre(model, suffix: Tensor, base: VLMInput, offset: int, prefix: KVCache) -> list[Tensor]:
    """`hook_resid_pre` of every block over the base run's positions `offset..`."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    cache, caching_hooks, _ = model.get_caching_hooks(names_filter=names)
    with model.hooks(fwd_hooks=caching_hooks):
        model.run_language_model(suffix, base.attention_mask, base.position_ids[:, offset:], prefix.frozen_copy())
    return [cache[name] for name in names]


def _suffix_patch_hooks(chunk: list[Head], source_z: dict[int, Tensor], positions: Tensor, relative: Tensor) -> list:
    """Copy i of the batch gets head chunk[i] replaced by the source at the patched positions."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, head) in enumerate(chunk):
        by_layer.setdefault(layer, []).append((row, head))
    hooks = []
    for layer, rows_heads in by_layer.items():
        rows = torch.tensor([r for r, _ in rows_heads])
        head_index = torch.tensor([h for _, h in rows_heads])

        def patch(z: Tensor, hook, rows=rows, head_index=head_index, layer=layer) -> Tensor:
            z = z.clone()
            src = source_z[layer][0][positions][:, head_index]  # [patched_pos, n_rows, d_head]
            z[rows[:, None], relative[None, :], head_index[:, None]] = src.transpose(0, 1).to(z)
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", patch))
    return hooks


@torch.no_grad()
def naive_head_patching(
    model,
    base: VLMInput,
    source: VLMInput,
    metric: Metric,
    positions: Sequence[int] | Tensor,
    *,
    heads: Sequence[Head] | None = None,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "layer head"]:
    """The reference: one full patched forward (vision tower included) per head."""
    _check_pair(base, source)
    heads = _checked_heads(model, heads)
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    offset = int(positions.min())
    out = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), dtype=torch.float64)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        source_z = _source_z(model, source)
        for layer, head in heads:

            def patch(z: Tensor, hook, layer=layer, head=head) -> Tensor:
                z = z.clone()
                z[:, positions, head] = source_z[layer][:, positions, head].to(z)
                return z

            logits = model.run_with_hooks(base, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
            out[layer, head] = metric(logits[:, offset:], offset)[0].item()
    return out


def head_attribution(
    model,
    base: VLMInput,
    source: VLMInput,
    metric: Metric,
    positions: Sequence[int] | Tensor | None = None,
    *,
    towers: Sequence[str] = ("language", "vision"),
    node: Literal["z", "pattern"] = "z",
    qk_fix: bool = True,
    fwd_hooks: Sequence = (),
) -> dict[str, Float[Tensor, "layer head"]]:
    """Attribution patching of every head: the first-order change of the metric if a head took
    the source's values, from one forward of the source and one forward + backward of the base.

    - node="z" (default; what `head_mediation` patches): `sum (z_src - z_base) * dM/dz` over the
      head's `hook_z` at the patched positions and d_head.
    - node="pattern": the head's attention pattern rows at the patched positions (its queries and
      keys). Plain AtP goes through the softmax linearly, `sum (S_src - S_base) * dM/dS` over the
      pre-softmax scores; with `qk_fix` (AtP*, Kramár et al. 2024) the pattern is taken exactly,
      `sum (A_src - A_base) * dM/dA`, which does not miss effects the softmax saturates.

    Language-model heads are patched at `positions` (query positions; default: all); vision-tower
    heads at every token of every view. Returns {"language": [L, H], "vision": [L_v, H_v]}.
    """
    _check_pair(base, source)
    if node not in ("z", "pattern"):
        raise ValueError(f"unknown node {node!r} (expected 'z' or 'pattern')")
    suffix = "hook_z" if node == "z" else ("hook_pattern" if qk_fix else "hook_attn_scores")
    names = _attention_names(model, towers, suffix)
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        _, source_cache = model.run_with_cache(source, names_filter=names, return_cache_object=False)

    base_acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        base_acts[hook.name] = x

    def leaf(x: Tensor, hook) -> Tensor:
        return x.detach().requires_grad_(True)  # every later activation then carries a gradient

    with torch.enable_grad(), model.hooks(
        fwd_hooks=list(fwd_hooks) + [("vision.hook_patch_embed", leaf), ("hook_embed", leaf)] + [(n, keep) for n in names]
    ):
        logits = model(base)
        offset = 0 if positions is None else int(torch.as_tensor(positions).min())
        value = metric(logits[:, offset:], offset).sum()
        grads = torch.autograd.grad(value, [base_acts[n] for n in names])

    lm_positions = None if positions is None else torch.as_tensor(positions, dtype=torch.long).flatten()
    scores: dict[str, list[Tensor]] = {"language": [], "vision": []}
    for name, grad in zip(names, grads):
        delta = source_cache[name].to(grad) - base_acts[name].detach()
        # masked scores hold the dtype's minimum in both runs: their difference is 0, not inf - inf
        contribution = (delta.nan_to_num(0.0) * grad).float()
        tower = "vision" if name.startswith("vision.") else "language"
        if node == "z":  # [batch, pos, head, d_head]
            if tower == "language" and lm_positions is not None:
                contribution = contribution[:, lm_positions]
            scores[tower].append(contribution.sum(dim=(0, 1, 3)))
        else:  # [batch, head, query, key]
            if tower == "language" and lm_positions is not None:
                contribution = contribution[:, :, lm_positions]
            scores[tower].append(contribution.sum(dim=(0, 2, 3)))
    # under a device map each layer's scores sit on its block's device: gather them on the first's
    return {tower: torch.stack([v.to(values[0].device) for v in values]) for tower, values in scores.items() if values}


def _attention_names(model, towers: Sequence[str], suffix: str) -> list[str]:
    unknown = set(towers) - {"language", "vision"}
    if unknown:
        raise ValueError(f"unknown towers {sorted(unknown)} (expected 'language' and/or 'vision')")
    names = []
    if "vision" in towers:
        names += [f"vision.blocks.{l}.attn.{suffix}" for l in range(model.cfg.vision.n_layers)]
    if "language" in towers:
        names += [f"blocks.{l}.attn.{suffix}" for l in range(model.cfg.n_layers)]
    return names


def expert_attribution(
    model,
    base: VLMInput,
    source: VLMInput | None,
    metric: Metric,
    positions: Sequence[int] | Tensor | None = None,
    *,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "layer expert"]:
    """Attribution patching of every expert of every mixture-of-experts layer: the first-order
    change of the metric if the expert's weighted output (`mlp.hook_expert_out`) at `positions`
    (default: all) took the source's value, `sum (out_src - out_base) . dM/d(mlp_out)` (every
    expert's output enters the MLP output with the same gradient). With `source=None`, if the
    expert were dropped (`iv.expert_ablation(mode="drop")`: its output zero, the token's other
    experts unchanged), `-sum out_base . dM/d(mlp_out)`.

    One forward and backward of the base, then one forward of the base and one of the source;
    each layer's `[batch, pos, expert, d_model]` outputs are reduced as they are computed, never
    kept. Returns `[n_layers, n_experts]` (NaN rows for dense layers).
    """
    from hooked_vlm.interventions.experts import moe_layers

    if source is not None:
        _check_pair(base, source)
    layers = moe_layers(model)
    offset = 0 if positions is None else int(torch.as_tensor(positions).min())
    lm_positions = None if positions is None else torch.as_tensor(positions, dtype=torch.long).flatten()
    grads = _mlp_out_grads(model, base, metric, offset, layers, fwd_hooks)

    def projected(inputs: VLMInput) -> dict[int, Tensor]:
        totals: dict[int, Tensor] = {}

        def reduce(expert_out: Tensor, hook) -> None:  # [batch, pos, expert, d_model]
            layer = int(hook.name.split(".")[1])
            out, grad = expert_out.float(), grads[layer].to(expert_out.device).float()
            if lm_positions is not None:
                out, grad = out[:, lm_positions], grad[:, lm_positions]
            totals[layer] = einops.einsum(out, grad, "b p e d, b p d -> e")

        names = [(f"blocks.{layer}.mlp.hook_expert_out", reduce) for layer in layers]
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks) + names):
            model(inputs)
        return totals

    base_totals = projected(base)
    source_totals = projected(source) if source is not None else {l: torch.zeros_like(t) for l, t in base_totals.items()}
    scores = torch.full((model.cfg.n_layers, model.cfg.text.num_experts), float("nan"))
    for layer in layers:
        scores[layer] = (source_totals[layer] - base_totals[layer]).cpu()
    return scores


def _mlp_out_grads(
    model, base: VLMInput, metric: Metric, offset: int, layers: list[int], fwd_hooks: Sequence
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """dM/d(hook_mlp_out) `[batch, pos, d_model]` of each layer at the base run."""
    names = {f"blocks.{layer}.hook_mlp_out": layer for layer in layers}
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        acts[hook.name] = x

    def leaf(x: Tensor, hook) -> Tensor:
        return x.detach().requires_grad_(True)  # every later activation then carries a gradient

    hooks = list(fwd_hooks) + [("hook_inputs_embeds", leaf)] + [(name, keep) for name in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(base)
        value = metric(logits[:, offset:], offset).sum()
        grads = torch.autograd.grad(value, [acts[name] for name in names])
    return {layer: grad for layer, grad in zip(names.values(), grads)}
