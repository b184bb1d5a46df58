"""Choosing a circuit from scored edges: top-n, greedy from the logits, threshold; pruning.

The rules are EAP-IG's (`graph.py`: `apply_topn`, `apply_greedy`, `apply_threshold`, `prune`), so
a circuit of n edges here is MIB's circuit of n edges:

- top-n keeps the n best real edges (by |score| or signed score; ties by index order), then
  marks as nodes those that have both an incoming and an outgoing edge, and prunes;
- greedy starts from the edges into the sink (the logits) and repeatedly takes the best edge
  whose child is already in the circuit, opening the parent's own incoming edges when the parent
  joins;
- pruning repeats until nothing changes: drop nodes lacking an incoming edge (a tower's input
  counts as having one) or an outgoing edge, then edges whose parent or child was dropped.
After pruning a circuit may hold fewer edges than asked for, never more.
"""

from __future__ import annotations

import heapq
from typing import Literal

import torch
from torch import Tensor

from hooked_vlm.circuits.graph import Graph

Method = Literal["topn", "greedy", "threshold"]


def find_circuit(
    graph: Graph,
    *,
    n_edges: int | None = None,
    fraction: float | None = None,
    method: Method = "topn",
    by: Literal["abs", "signed"] = "abs",
    threshold: float | None = None,
    prune: bool = True,
) -> Graph:
    """A copy of `graph` whose `in_circuit` holds the chosen edges (and `node_in_circuit` their nodes).

    Size: `n_edges`, or `fraction` of the real edges (`int(fraction * n_edges)`, as MIB), or with
    `method="threshold"` every edge scoring at least `threshold`. `by`: rank by |score| ("abs",
    MIB's CMD) or signed score ("signed", MIB's CPR). Unscored (NaN) edges are never chosen.
    """
    if method not in ("topn", "greedy", "threshold"):
        raise ValueError(f"unknown method {method!r} (expected 'topn', 'greedy' or 'threshold')")
    if by not in ("abs", "signed"):
        raise ValueError(f"by must be 'abs' or 'signed', got {by!r}")
    circuit = graph.copy()
    key = circuit.scores.abs() if by == "abs" else circuit.scores.clone()
    key = torch.where(circuit.real_mask() & ~key.isnan(), key, float("-inf"))
    if method == "threshold":
        if threshold is None or n_edges is not None or fraction is not None:
            raise ValueError("method='threshold' takes `threshold` and neither n_edges nor fraction")
        circuit.in_circuit = key >= float(threshold)
    else:
        if threshold is not None:
            raise ValueError(f"`threshold` is for method='threshold', not {method!r}")
        n = _size(graph, n_edges, fraction)
        circuit.in_circuit = _topn(key, n) if method == "topn" else _greedy(circuit, key, n)
    if method != "greedy":
        circuit.node_in_circuit = _nodes_with_both(circuit)
    if prune:
        prune_circuit(circuit)
    circuit.meta = {**graph.meta, "selection": {"method": method, "by": by, "n_edges": n_edges, "fraction": fraction,
                                                "threshold": threshold, "prune": prune}}  # fmt: skip
    return circuit


def _size(graph: Graph, n_edges: int | None, fraction: float | None) -> int:
    if (n_edges is None) == (fraction is None):
        raise ValueError("give exactly one of n_edges and fraction")
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        n_edges = int(fraction * graph.n_edges)
    if not 0 <= n_edges <= graph.n_edges:
        raise ValueError(f"n_edges must be in [0, {graph.n_edges}] (the graph's real edges), got {n_edges}")
    return int(n_edges)


def _topn(key: Tensor, n: int) -> Tensor:
    chosen = torch.zeros(key.numel(), dtype=torch.bool)
    order = torch.argsort(key.flatten(), descending=True, stable=True)[:n]
    chosen[order[key.flatten()[order] > float("-inf")]] = True
    return chosen.view(key.shape)


def _greedy(circuit: Graph, key: Tensor, n: int) -> Tensor:
    """EAP-IG's `apply_greedy`: a max-heap of candidate edges whose child is in the circuit."""
    key = key if circuit.spans is None else key  # spans: one candidate per (edge, span)
    flat_key = key.reshape(circuit.n_src, circuit.n_dst, -1)
    chosen = torch.zeros_like(flat_key, dtype=torch.bool)
    nodes = torch.zeros(circuit.n_src, dtype=torch.bool)
    heap: list[tuple[float, int, int, int]] = []

    def push_parents_of(destinations: Tensor) -> None:
        for dst in destinations.tolist():
            for src, span in (flat_key[:, dst] > float("-inf")).nonzero().tolist():
                heapq.heappush(heap, (-float(flat_key[src, dst, span]), src, dst, span))

    push_parents_of(torch.tensor([circuit.structure.sink().start]))
    while n > 0 and heap:
        _, src, dst, span = heapq.heappop(heap)
        chosen[src, dst, span] = True
        n -= 1
        if not nodes[src]:
            nodes[src] = True
            push_parents_of(circuit.owner[src].nonzero().flatten())
    circuit.node_in_circuit = nodes
    return chosen.view(key.shape)


def _nodes_with_both(circuit: Graph) -> Tensor:
    edges = _edge_any(circuit.in_circuit & circuit.real_mask())
    outgoing = edges.any(dim=1)
    incoming = (circuit.owner & edges.any(dim=0)[None, :]).any(dim=1)
    return outgoing & (incoming | _inputs(circuit))


def prune_circuit(circuit: Graph) -> Graph:
    """Drop, until nothing changes, nodes without an incoming (inputs excepted) or outgoing edge
    and edges whose parent or child is not in the circuit. In place; returns the graph."""
    circuit.in_circuit &= circuit.real_mask()
    sink = torch.zeros(circuit.n_dst, dtype=torch.bool)
    sink[circuit.structure.sink().slice] = True
    while True:
        before_nodes, before_edges = circuit.node_in_circuit.clone(), circuit.in_circuit.clone()
        circuit.node_in_circuit &= _nodes_with_both(circuit)
        child_present = (circuit.owner & circuit.node_in_circuit[:, None]).any(dim=0) | sink
        keep = circuit.node_in_circuit[:, None] & child_present[None, :]
        circuit.in_circuit &= keep if circuit.spans is None else keep[..., None]
        if torch.equal(before_nodes, circuit.node_in_circuit) and torch.equal(before_edges, circuit.in_circuit):
            return circuit


def _edge_any(in_circuit: Tensor) -> Tensor:
    return in_circuit if in_circuit.dim() == 2 else in_circuit.any(dim=-1)


def _inputs(circuit: Graph) -> Tensor:
    inputs = torch.zeros(circuit.n_src, dtype=torch.bool)
    for span in circuit.structure.sources:
        if span.key == "input":
            inputs[span.slice] = True
    return inputs
