"""Edge attribution: EAP, EAP-IG and clean-corrupted scores of every edge in one graph.

The score of edge u → v is the first-order change of the metric when v's input receives u's
corrupted output instead of its clean one (Syed et al. 2023; Hanna et al. 2024):

    s(u→v) = Σ_{rows, positions, d_model} (ã_u − a_u) · ∂M/∂x_v

averaged over pairs' rows (and span-resolved when the pairs carry spans). EAP takes the gradient
at the clean input; EAP-IG averages it over inputs interpolated from the corrupted input (α = 0)
to the clean one (α = 1), `e(α) = ẽ + α (e − ẽ)`, at the language model's input embeddings, the
vision tower's embeddings or the pixels; clean-corrupted averages the two endpoints.

How (`backend="vjp"`): one plain forward per step keeps each destination's tensors — the
branch input before the norm (`hook_attn_in`, `hook_mlp_in`), `hook_q/k/v`, the last residual
stream — and one backward gives their gradients. A head's per-destination input gradient is
then `ln1`'s vector-Jacobian product of `grad_q[h] @ W_Q[h]ᵀ` (likewise k and v), in closed
form, without per-head copies of the residual stream in the autograd graph. Activation
differences and scores are kept in fp32 (the model's dtype when it is fp64), whatever the model
runs in. `backend="mask"` (EAP only) differentiates the edge-masked forward instead: the
reference the fast route is tested against.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Literal, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.circuits.forward import edge_forward
from hooked_vlm.circuits.sources import Sources, accumulation_dtype, source_outputs, source_space
from hooked_vlm.circuits.graph import Graph
from hooked_vlm.circuits.pairs import CircuitPair, as_pairs, metric_values, span_names
from hooked_vlm.circuits.structure import KV, Structure
from hooked_vlm.components.norms import LayerNorm, RMSNorm

Method = Literal["EAP", "EAP-IG", "clean-corrupted", "exact"]
Rule = Literal["left", "right", "midpoint"]
IGInput = Literal["inputs_embeds", "vision_embed", "pixels"]


def edge_attribution(
    model,
    pairs: CircuitPair | Sequence[CircuitPair],
    *,
    method: Method = "EAP-IG",
    steps: int | None = None,
    rule: Rule | None = None,
    ig_input: IGInput | None = None,
    towers: Sequence[str] = ("language",),
    kv: KV = "ungrouped",
    graph: Graph | None = None,
    direction: Literal["noising", "denoising"] = "noising",
    backend: Literal["vjp", "mask"] = "vjp",
    aggregation: Literal["mean", "mean_abs"] = "mean",
    batch_size: int = 16,
    progress: bool = True,
    fwd_hooks: Sequence = (),
) -> Graph:
    """A `Graph` (over `towers`, key/values `kv`) whose `scores` are every edge's attribution.

    `method`: "EAP-IG" (default; `steps` interpolation steps, 5 by default, `rule` "left" — α = k/m, k = 0..m−1,
    the convention of EAP-IG's current code and MIB — "right" (k = 1..m, the 2024 paper's) or
    "midpoint"), "EAP", "clean-corrupted", or "exact" (every edge patched alone: toys, or a
    graph's top edges; `batch_size` patched copies per forward). `direction="denoising"` runs the
    corrupted input and restores clean edges (scores ≈ M(edge restored) − M(corrupted)); the
    default noising scores ≈ M(edge corrupted) − M(clean). `aggregation="mean_abs"` averages each
    pair's |score| (Nikankin et al.'s per-prompt absolute value: edges whose sign flips between
    pairs do not cancel); the default signed mean is MIB's. `fwd_hooks` stay attached to every run.
    """
    pairs = as_pairs(pairs, model)
    graph = _graph(model, pairs, graph, towers, kv)
    if method == "exact":
        from hooked_vlm.circuits.exact import exact_edge_effects

        return exact_edge_effects(model, pairs, graph=graph, direction=direction, batch_size=batch_size,
                                  progress=progress, fwd_hooks=fwd_hooks)  # fmt: skip
    alphas = ig_alphas(method, steps, rule)
    if method == "EAP" and any(getattr(pair.metric, "divergence", False) for pair in pairs):
        raise ValueError("the metric is a divergence from the clean run, minimal (zero gradient) at the clean input: "
                         "EAP would score every edge 0; use method='EAP-IG'")  # fmt: skip
    if ig_input is None:
        ig_input = "inputs_embeds" if "vision" not in graph.structure.towers else "vision_embed"
    if ig_input not in ("inputs_embeds", "vision_embed", "pixels"):
        raise ValueError(f"unknown ig_input {ig_input!r} (expected 'inputs_embeds', 'vision_embed' or 'pixels')")
    if ig_input == "inputs_embeds" and "vision" in graph.structure.towers:
        raise ValueError("with the vision tower in the graph, interpolate upstream of it: ig_input='vision_embed' or 'pixels'")
    if backend not in ("vjp", "mask"):
        raise ValueError(f"unknown backend {backend!r} (expected 'vjp' or 'mask')")
    if aggregation not in ("mean", "mean_abs"):
        raise ValueError(f"unknown aggregation {aggregation!r} (expected 'mean' or 'mean_abs')")
    if backend == "mask" and method != "EAP":
        raise ValueError("backend='mask' differentiates the edge-masked forward at the clean run: method='EAP' only")
    dtype = accumulation_dtype(model.dtype)
    scores = torch.zeros(graph.scores.shape, dtype=dtype, device=model.device)
    n_rows = 0
    for pair in tqdm(pairs, desc=f"edge attribution ({method})", disable=not progress):
        clean, corrupted = (pair.clean, pair.corrupted) if direction == "noising" else (pair.corrupted, pair.clean)
        clean_src, corr_src, endpoints = _reference_runs(model, graph.structure, clean, corrupted, ig_input, fwd_hooks)
        pair_scores = torch.zeros_like(scores)
        if backend == "mask":
            pair_scores += _mask_scores(model, graph, pair, clean, corr_src, fwd_hooks).to(scores.device)
        else:
            deltas = _Differences(graph.structure, corr_src, clean_src, dtype)
            masks = None if pair.spans is None else pair.spans.masks()
            for alpha in alphas:
                grads = destination_gradients(model, graph.structure, pair.metric, clean, endpoints, alpha, fwd_hooks)
                if method == "EAP" and grads.all_zero():
                    raise ValueError("the metric's gradient is zero at the clean input (a divergence from the clean run, "
                                     "such as KL, is minimal there): EAP would score every edge 0; use method='EAP-IG'")  # fmt: skip
                _accumulate(pair_scores, graph.structure, deltas, grads, masks)
        scores += pair_scores if aggregation == "mean" else pair_scores.abs()
        n_rows += len(clean)
    graph.scores = (scores / (n_rows * len(alphas))).cpu()
    graph.meta = {"method": method, "steps": len(alphas), "rule": rule if method == "EAP-IG" else None,
                  "ig_input": ig_input, "direction": direction, "backend": backend, "aggregation": aggregation, "n_pairs": len(pairs),
                  "n_rows": n_rows, "model_dtype": str(model.dtype), "score_dtype": str(dtype)}  # fmt: skip
    return graph


def ig_alphas(method: str, steps: int | None, rule: str | None) -> list[float]:
    """Where the gradients are taken, as α (0 = corrupted, 1 = clean)."""
    if method in ("EAP", "clean-corrupted") and (steps not in (None, 1) or rule is not None):
        raise ValueError(f"method={method!r} takes its gradients at fixed points: no steps or rule (got steps={steps}, rule={rule!r}); "
                         "IG steps and rules are for method='EAP-IG'")  # fmt: skip
    if method == "EAP":
        return [1.0]
    if method == "clean-corrupted":
        return [1.0, 0.0]
    if method != "EAP-IG":
        raise ValueError(f"unknown method {method!r} (expected 'EAP', 'EAP-IG', 'clean-corrupted' or 'exact')")
    steps = 5 if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    rule = rule or "left"
    if rule == "left":
        return [k / steps for k in range(steps)]
    if rule == "right":
        return [k / steps for k in range(1, steps + 1)]
    if rule == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    raise ValueError(f"unknown rule {rule!r} (expected 'left', 'right' or 'midpoint')")


def _graph(model, pairs: list[CircuitPair], graph: Graph | None, towers, kv) -> Graph:
    spans = span_names(pairs)
    vision = "vision" in (towers if graph is None else graph.structure.towers)
    if spans is not None and vision and any(pair.spans.vision is None for pair in pairs):
        raise ValueError("a graph over the vision tower needs spans of its positions too (Spans.from_layout makes them)")
    if graph is None:
        return Graph.from_model(model, towers=towers, kv=kv, spans=spans)
    graph.check_model(model)
    if graph.spans != spans:
        raise ValueError(f"the graph's spans {graph.spans} differ from the pairs' {spans}")
    return graph.copy()


# ------------------------------------------------------------------------------ gradients
def _reference_runs(model, structure: Structure, clean, corrupted, ig_input: str, fwd_hooks) -> tuple[Sources, Sources, dict]:
    """Source outputs of the clean and corrupted runs, and the (corrupted, clean) values of the
    tensors IG interpolates, by hook name ("pixels": the pixel values)."""
    names = {"inputs_embeds": ["hook_inputs_embeds"], "vision_embed": ["vision.blocks.0.hook_resid_pre", "hook_embed"],
             "pixels": ["hook_embed"]}[ig_input]  # fmt: skip
    values: dict[str, list[Tensor]] = {name: [] for name in names}

    def keep(x: Tensor, hook) -> None:
        values[hook.name].append(x.detach())

    hooks = list(fwd_hooks) + [(name, keep) for name in names]
    with torch.no_grad():
        # no residual streams: only a plain edge_forward reads them, and they would live as long as the pair
        _, corr_src = source_outputs(model, corrupted, structure, hooks, streams=False)
        _, clean_src = source_outputs(model, clean, structure, hooks, streams=False)
    endpoints = {name: (v[0], v[1]) for name, v in values.items()}
    if ig_input == "pixels":
        endpoints["pixels"] = (corrupted.pixel_values, clean.pixel_values)
    return clean_src, corr_src, endpoints


def destination_gradients(model, structure: Structure, metric, inputs, endpoints: dict, alpha: float,
                          fwd_hooks=()) -> _Gradients:  # fmt: skip
    """∂(Σ_rows M)/∂x_v of every destination group, `[rows, pos, n, d_model]` (made group by
    group by `.items()`), at the input interpolated to `alpha` between the endpoints'
    corrupted (0) and clean (1) values."""
    dtype = accumulation_dtype(model.dtype)

    def point(name: str) -> Tensor:
        corrupted, clean = endpoints[name]
        # pixels are fp32 whatever the model: interpolate them at the model's precision when it is higher
        out = torch.promote_types(corrupted.dtype, model.dtype) if name == "pixels" else corrupted.dtype
        return (corrupted.to(dtype) + alpha * (clean.to(dtype) - corrupted.to(dtype))).to(out).requires_grad_(True)

    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> Tensor | None:
        if hook.name.endswith("hook_attn_in"):  # the norm's input, for its vector-Jacobian product
            kept[hook.name] = x.detach()
            return None
        kept[hook.name] = x.view_as(x)  # a node of its own: the gradient of this branch only
        return kept[hook.name]

    replace_hooks = [(name, lambda x, hook: point(hook.name)) for name in endpoints if name not in ("pixels", "hook_inputs_embeds")]
    keep_hooks = [(name, keep) for name in _destination_hooks(structure)]
    with torch.enable_grad(), ungrouped_kv(model, structure.kv == "ungrouped"), model.hooks(fwd_hooks=list(fwd_hooks) + replace_hooks + keep_hooks):
        if "hook_inputs_embeds" in endpoints:  # the vision tower need not run again
            logits = model.run_language_model(point("hook_inputs_embeds"), inputs.attention_mask, inputs.position_ids)
        elif "pixels" in endpoints:
            logits = model(replace(inputs, pixel_values=point("pixels")))
        else:
            logits = model(inputs)
        value = metric_values(metric, logits.to(dtype) if logits.dtype != torch.float64 else logits).sum()
        wanted = [name for name in kept if not name.endswith("hook_attn_in")]
        grads = dict(zip(wanted, torch.autograd.grad(value, [kept[name] for name in wanted], allow_unused=True)))
    return _Gradients(model, structure, kept, grads, dtype)


class _Gradients:
    """Destination-input gradients made one group at a time when read: a whole model's at once
    would be `[pos, 3 * n_heads, d_model]` per layer (tens of GB for a 7B model); one group's is
    one layer's q, k or v."""

    def __init__(self, model, structure: Structure, kept: dict, grads: dict, dtype):
        self.model, self.structure, self.kept, self.grads, self.dtype = model, structure, kept, grads, dtype

    def all_zero(self) -> bool:
        return all(g is None or not g.any() for g in self.grads.values())

    def items(self):
        for group in range(len(self.structure.destinations)):
            yield group, _input_gradient(self.model, self.structure, group, self.kept, self.grads, self.dtype)


def _destination_hooks(structure: Structure) -> list[str]:
    names = []
    for tower in structure.towers:
        p = "vision." if tower == "vision" else ""
        n_layers = structure.shapes[tower].n_layers
        for layer in range(n_layers):
            names += [f"{p}blocks.{layer}.hook_attn_in"] + [f"{p}blocks.{layer}.attn.hook_{x}" for x in "qkv"]
            names.append(f"{p}blocks.{layer}.hook_mlp_in")
        names.append(f"{p}blocks.{n_layers - 1}.hook_resid_post")
    return names


def _input_gradient(model, structure: Structure, group: int, kept: dict, grads: dict, dtype) -> Tensor:
    span = structure.destinations[group]
    vision = span.tower == "vision" or span.key == "projector"
    p = "vision." if vision else ""
    blocks = model.vision.blocks if vision else model.blocks
    if span.key in ("logits", "projector"):
        name = f"{p}blocks.{len(blocks) - 1}.hook_resid_post"
        return _grad(grads, name, kept[name], dtype)[:, :, None]
    if span.key == "mlp":
        name = f"{p}blocks.{span.layer}.hook_mlp_in"
        return _grad(grads, name, kept[name], dtype)[:, :, None]
    block = blocks[span.layer]
    name = f"{p}blocks.{span.layer}.attn.hook_{span.key}"
    grad = _grad(grads, name, kept[name], dtype)  # [rows, pos, n, d_head]
    proj = {"q": block.attn.q_proj, "k": block.attn.k_proj, "v": block.attn.v_proj}[span.key]
    if grad.shape[2] != len(span):
        raise RuntimeError(f"{name} has {grad.shape[2]} heads but the graph has {len(span)} destinations")
    # the norm's weight folded into the projection: ∂M/∂norm(x) times that weight in one product
    weight = block.attn.input_weight(proj, grad.shape[2]).to(dtype) * block.ln1.weight.to(dtype)[None, :, None]
    weighted = torch.einsum("rphe,hme->rphm", grad, weight)
    return norm_vjp(block.ln1, kept[f"{p}blocks.{span.layer}.hook_attn_in"].to(dtype), weighted)


def _grad(grads: dict, name: str, like: Tensor, dtype) -> Tensor:
    grad = grads.get(name)
    return torch.zeros(like.shape, dtype=dtype, device=like.device) if grad is None else grad.to(dtype)


def norm_vjp(norm, x: Float[Tensor, "rows pos d"], weighted: Float[Tensor, "rows pos n d"]) -> Float[Tensor, "rows pos n d"]:
    """∂M/∂x for n readers of one norm input x, given `weighted` = ∂M/∂norm(x) times the norm's
    weight for each reader (closed form; the norm's statistics are those of x, shared by every
    reader). `weighted` is overwritten: this runs for every head of every layer at every step,
    and in place with one batched product it makes two passes over it instead of eight."""
    rows, pos, n, d = weighted.shape
    flat = weighted.view(rows * pos, n, d)
    x = x.reshape(rows * pos, d)
    if isinstance(norm, RMSNorm):
        inv = torch.rsqrt(x.pow(2).mean(-1) + norm.eps)  # [rows·pos]
        along = torch.bmm(flat, x[:, :, None]) * (inv**3 / d)[:, None, None]  # (weighted · x) inv³ / d
        flat.mul_(inv[:, None, None]).baddbmm_(along, x[:, None, :], alpha=-1)
        return weighted
    if isinstance(norm, LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(centred.pow(2).mean(-1) + norm.eps)
        normed = centred * inv[:, None]
        along = torch.bmm(flat, normed[:, :, None]) / d  # mean(weighted · normed)
        flat.sub_(flat.mean(-1, keepdim=True)).baddbmm_(along, normed[:, None, :], alpha=-1).mul_(inv[:, None, None])
        return weighted
    raise TypeError(f"no vector-Jacobian product for {type(norm).__name__}")


@contextlib.contextmanager
def ungrouped_kv(model, on: bool = True):
    """Keys and values per query head (`hook_k`/`hook_v` `[batch, pos, n_heads, d_head]`) for the
    duration; outputs are unchanged (each head reads a copy of its group's key and value)."""
    modules = [m for m in model.modules() if hasattr(m, "ungroup_kv")] if on else []
    before = [m.ungroup_kv for m in modules]
    for m in modules:
        m.ungroup_kv = True
    try:
        yield model
    finally:
        for m, value in zip(modules, before):
            m.ungroup_kv = value


class _Differences:
    """Every source's activation difference (corrupted − clean), one contiguous matrix per
    residual space (`[n sources of the space, rows·pos·d_model]`; the projector writes into the
    language model's): a destination's parents are consecutive sources of one space, so its
    scores are one matrix product with no copy of the differences (an einsum per (source,
    destination) group copied and permuted both, ~90% of EAP-IG's time)."""

    def __init__(self, structure: Structure, corrupted: Sources, clean: Sources, dtype) -> None:
        self.structure = structure
        self.matrices: dict[str, Tensor] = {}
        self.first: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for space in ("vision", "language"):
            groups = [g for g in list(corrupted) if source_space(structure.sources[g]) == space]
            if not groups:
                continue
            spans = [structure.sources[g] for g in groups]
            first, stop = min(span.start for span in spans), max(span.stop for span in spans)
            rows, pos = corrupted[groups[0]].shape[:2]
            matrix = None
            for group, span in zip(groups, spans):
                # group by group, each run's outputs freed as their difference is made: the peak is
                # about the fp32 differences, not three copies of every source's output
                delta = corrupted.pop(group).to(dtype) - clean.pop(group).to(dtype)
                if matrix is None:
                    matrix = torch.empty(stop - first, rows * pos * delta.shape[-1], dtype=dtype, device=delta.device)
                matrix[span.start - first : span.stop - first] = einops.rearrange(delta, "r p u d -> u (r p d)").to(matrix.device)
            self.matrices[space], self.first[space], self.shapes[space] = matrix, first, (rows, pos)

    def parents(self, group: int) -> tuple[str, slice, Tensor]:
        """(space, the parents' rows of the score matrix, their differences) of destination `group`."""
        spans = [self.structure.sources[p] for p in self.structure.parents[group]]
        start, stop = min(span.start for span in spans), max(span.stop for span in spans)
        space = source_space(spans[0])
        if sum(len(span) for span in spans) != stop - start:
            raise RuntimeError(f"the parents of destination group {group} are not consecutive sources")
        first = self.first[space]
        return space, slice(start, stop), self.matrices[space][start - first : stop - first]


def _accumulate(scores: Tensor, structure: Structure, deltas: _Differences, grads: _Gradients, masks) -> None:
    for group, grad in grads.items():
        dst = structure.destinations[group]
        space, rows, delta = deltas.parents(group)
        grad = grad.to(delta.device)
        if masks is None:
            scores[rows, dst.slice] += (delta @ einops.rearrange(grad, "r p v d -> (r p d) v")).to(scores.device)
            continue
        for k, mask in enumerate(masks[space]):
            masked = grad * mask.to(grad.device).reshape(deltas.shapes[space])[:, :, None, None]
            scores[rows, dst.slice, k] += (delta @ einops.rearrange(masked, "r p v d -> (r p d) v")).to(scores.device)


def _mask_scores(model, graph: Graph, pair: CircuitPair, clean, corr_src: Sources, fwd_hooks) -> Tensor:
    """Σ_rows ∂M/∂w at w = 0 through the edge-masked forward (AutoCircuit's identity with EAP)."""
    dtype = accumulation_dtype(model.dtype)
    weights = torch.zeros(graph.scores.shape, dtype=dtype, device=model.device, requires_grad=True)
    span_index = None if pair.spans is None else pair.spans.index()
    with torch.enable_grad():
        logits = edge_forward(model, clean, graph.structure, weights, corr_src, span_index, fwd_hooks)
        value = metric_values(pair.metric, logits.to(dtype) if logits.dtype != torch.float64 else logits).sum()
        (grad,) = torch.autograd.grad(value, [weights])
    return torch.where(graph.real_mask().to(grad.device), grad, 0.0)
