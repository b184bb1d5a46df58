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

from hooked_vlm.circuits.forward import edge_forward
from hooked_vlm.circuits.sources import accumulation_dtype, source_outputs
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
    pairs = as_pairs(pairs, model)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if graph is None:
        graph = Graph.from_model(model, towers=towers, kv=kv, spans=span_names(pairs))
    else:
        graph.check_model(model)
        graph = graph.copy()
    index = _edge_indices(graph, edges)
    layers = _destination_layers(graph, index)
    order = sorted(range(len(index)), key=lambda i: layers[i])  # edges into one layer share a resumed run
    dtype = accumulation_dtype(model.dtype)
    totals = torch.zeros(len(index), dtype=torch.float64)
    n_rows = 0
    bar = tqdm(total=len(pairs) * len(index), desc="exact edge effects", disable=not progress)
    for pair in pairs:
        clean, corrupted = (pair.clean, pair.corrupted) if direction == "noising" else (pair.corrupted, pair.clean)
        with torch.no_grad():
            resid, keep = _residual_recorder(model)
            clean_logits, clean_src = source_outputs(model, clean, graph.structure, list(fwd_hooks) + keep, streams=False)
            _, corr_src = source_outputs(model, corrupted, graph.structure, fwd_hooks)
            baseline = metric_values(pair.metric, clean_logits.to(dtype)).double()
            span_index = None if pair.spans is None else pair.spans.index()
            copies = batch_size if len(clean) == 1 else 1
            for chunk in _chunks(order, layers, copies):
                weights = torch.zeros((len(chunk),) + tuple(graph.scores.shape), dtype=dtype, device=model.device)
                for row, i in enumerate(chunk):
                    weights[(row,) + index[i]] = 1.0
                if len(clean) > 1:
                    weights = weights[0]
                layer = layers[chunk[0]]
                resume = (layer, resid[layer], clean_src) if graph.structure.towers == ("language",) else None
                logits = edge_forward(model, clean, graph.structure, weights, corr_src, span_index, fwd_hooks, resume)
                values = metric_values(pair.metric, logits.to(dtype)).double()
                effects = (values - baseline) if len(clean) == 1 else (values - baseline).sum(0, keepdim=True)
                totals[chunk] += effects.cpu()
                bar.update(len(chunk))
        n_rows += len(clean)
    bar.close()
    graph.scores = torch.full(graph.scores.shape, float("nan"), dtype=torch.float64)
    for edge, total in zip(index, (totals / n_rows).tolist()):
        graph.scores[edge] = total
    graph.meta = {"method": "exact", "direction": direction, "n_pairs": len(pairs), "n_rows": n_rows,
                  "model_dtype": str(model.dtype), "score_dtype": "torch.float64"}  # fmt: skip
    return graph


def _destination_layers(graph: Graph, index: list[tuple[int, ...]]) -> list[int]:
    layer_of = torch.zeros(graph.n_dst, dtype=torch.long)
    for span in graph.structure.destinations:
        layer_of[span.slice] = span.layer
    return [int(layer_of[i[1]]) for i in index]


def _chunks(order: list[int], layers: list[int], size: int):
    chunk: list[int] = []
    for i in order:
        if chunk and (len(chunk) == size or layers[i] != layers[chunk[0]]):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def _residual_recorder(model) -> tuple[dict[int, Tensor], list]:
    """{layer: the residual stream entering block `layer`; n_layers: the last block's output}."""
    resid: dict[int, Tensor] = {}
    n = model.cfg.n_layers

    def keep(x: Tensor, hook) -> None:
        layer = int(hook.name.split(".")[1])
        resid[layer if hook.name.endswith("resid_pre") else n] = x

    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    return resid, [(name, keep) for name in names]


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
