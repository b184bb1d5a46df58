"""Exact edge effects: M with one edge corrupted, minus M of the clean run, for chosen edges.

Each edge is patched alone in the edge-masked forward (`hooked_vlm.circuits.forward`); a batch-1
pair runs `batch_size` differently patched copies side by side. This is the ground truth the
attribution methods approximate: for a toy model every edge (seconds), for a real one the top
edges of an attribution (`edges=graph.edges(top=200)["edge"]`), about two forwards per edge.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.circuits.forward import accumulation_dtype, edge_forward, source_outputs
from hooked_vlm.circuits.graph import Graph
from hooked_vlm.circuits.pairs import CircuitPair, as_pairs, metric_values, span_names


def exact_edge_effects(
    model,
    pairs: CircuitPair | Sequence[CircuitPair],
    edges: Sequence[str] | None = None,
    *,
    graph: Graph | None = None,
    towers: Sequence[str] = ("language",),
    kv: str = "ungrouped",
    direction: str = "noising",
    batch_size: int = 16,
    progress: bool = True,
    fwd_hooks: Sequence = (),
) -> Graph:
    """A graph whose scores are exact effects, `mean M(edge corrupted) − mean M(clean)` over the
    pairs' rows (denoising: `M(edge restored) − M(corrupted)`), for `edges` (EAP-IG names, with
    '@span' when the pairs have spans; default every real edge); other scores are NaN."""
    pairs = as_pairs(pairs)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if graph is None:
        graph = Graph.from_model(model, towers=towers, kv=kv, spans=span_names(pairs))
    else:
        graph.check_model(model)
        graph = graph.copy()
    index = _edge_indices(graph, edges)
    dtype = accumulation_dtype(model.dtype)
    totals = torch.zeros(len(index), dtype=torch.float64)
    n_rows = 0
    bar = tqdm(total=len(pairs) * len(index), desc="exact edge effects", disable=not progress)
    for pair in pairs:
        clean, corrupted = (pair.clean, pair.corrupted) if direction == "noising" else (pair.corrupted, pair.clean)
        with torch.no_grad():
            clean_logits, _ = source_outputs(model, clean, graph.structure, fwd_hooks)
            _, corr_src = source_outputs(model, corrupted, graph.structure, fwd_hooks)
            baseline = metric_values(pair.metric, clean_logits.to(dtype)).double()
            span_index = None if pair.spans is None else pair.spans.index()
            copies = batch_size if len(clean) == 1 else 1
            for start in range(0, len(index), copies):
                chunk = index[start : start + copies]
                weights = torch.zeros((len(chunk),) + tuple(graph.scores.shape), dtype=dtype, device=model.device)
                for row, edge in enumerate(chunk):
                    weights[(row,) + edge] = 1.0
                if len(clean) > 1:
                    weights = weights[0]
                logits = edge_forward(model, clean, graph.structure, weights, corr_src, span_index, fwd_hooks)
                values = metric_values(pair.metric, logits.to(dtype)).double()
                effects = (values - baseline) if len(clean) == 1 else (values - baseline).sum(0, keepdim=True)
                totals[start : start + len(chunk)] += effects.cpu()
                bar.update(len(chunk))
        n_rows += len(clean)
    bar.close()
    graph.scores = torch.full(graph.scores.shape, float("nan"), dtype=torch.float64)
    for edge, total in zip(index, (totals / n_rows).tolist()):
        graph.scores[edge] = total
    graph.meta = {"method": "exact", "direction": direction, "n_pairs": len(pairs), "n_rows": n_rows,
                  "model_dtype": str(model.dtype), "score_dtype": "torch.float64"}  # fmt: skip
    return graph


def _edge_indices(graph: Graph, edges: Sequence[str] | None) -> list[tuple[int, ...]]:
    if edges is None:
        return [tuple(i) for i in graph.real_mask().nonzero().tolist()]
    if isinstance(edges, str):
        raise TypeError("edges must be a sequence of edge names, not one string")
    index = [graph.edge_index(name) for name in edges]
    if not index:
        raise ValueError("no edges to patch")
    return index


def edge_forward_metric(model, pair: CircuitPair, graph: Graph, weights: Tensor, fwd_hooks=()) -> Tensor:
    """Σ_rows M of the clean input with corruption `weights` (`graph.scores`' shape; 1 = the
    edge's corrupted contribution, 0 = its clean one). Differentiable in `weights`."""
    with torch.no_grad():
        _, corr_src = source_outputs(model, pair.corrupted, graph.structure, fwd_hooks)
    span_index = None if pair.spans is None else pair.spans.index()
    logits = edge_forward(model, pair.clean, graph.structure, weights, corr_src, span_index, fwd_hooks)
    dtype = accumulation_dtype(model.dtype)
    return metric_values(pair.metric, logits.to(dtype)).sum()
