"""How faithful a circuit is: run the model with every edge outside it corrupted.

`evaluate_circuit` runs the edge-masked forward (`hooked_vlm.circuits.forward`) with the edges
outside the circuit taking the corrupted run's contribution (noising; with
`direction="denoising"` the corrupted input runs and the circuit's edges are restored from the
clean one), and reports the normalised faithfulness of MIB (`MIB_circuit_track/evaluation.py`),
a ratio of means over every row of every pair:

    f(C) = (M(C) − M(∅)) / (M(G) − M(∅))

with M(G) the clean model (every edge kept) and M(∅) the corrupted run (none kept).
`faithfulness_curve` evaluates the top circuits at MIB's edge fractions and integrates them:
CPR, the area under f (higher is better; ranked by signed score), and CMD, the area under
|1 − f| (lower is better; ranked by |score|), trapezoids over the linear fraction axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hooked_vlm.circuits.forward import edge_forward
from hooked_vlm.circuits.sources import accumulation_dtype, source_outputs
from hooked_vlm.circuits.graph import Graph
from hooked_vlm.circuits.pairs import CircuitPair, as_pairs, metric_values, span_names
from hooked_vlm.circuits.selection import find_circuit

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class CircuitEvaluation:
    """`table`: one row per pair row (`pair`, `row`, `m_clean`, `m_corrupted`, `m_circuit`,
    `faithfulness` of that row alone); `faithfulness`: the ratio of means; `ci`: its 95%
    bootstrap interval over rows; the circuit's size."""

    table: pd.DataFrame
    faithfulness: float
    ci: tuple[float, float]
    n_edges: int
    n_nodes: int
    n_edges_total: int

    def __repr__(self) -> str:
        return (f"CircuitEvaluation(faithfulness={self.faithfulness:.4g}, 95% CI [{self.ci[0]:.4g}, {self.ci[1]:.4g}], "
                f"{self.n_edges}/{self.n_edges_total} edges, {self.n_nodes} nodes, {len(self.table)} rows)")  # fmt: skip


@dataclass
class FaithfulnessCurve:
    """`table`: one row per fraction (`fraction`, `n_edges` asked, `n_edges_kept` after pruning,
    `n_nodes`, `m_circuit`, `faithfulness`); `cpr` / `cmd`: MIB's areas."""

    table: pd.DataFrame
    m_clean: float
    m_corrupted: float
    by: str
    method: str
    meta: dict = field(default_factory=dict)

    @property
    def cpr(self) -> float:
        return area_under(self.table["fraction"], self.table["faithfulness"])

    @property
    def cmd(self) -> float:
        return area_from_one(self.table["fraction"], self.table["faithfulness"])


def evaluate_circuit(model, circuit: Graph, pairs: CircuitPair | Sequence[CircuitPair], *,
                     direction: Literal["noising", "denoising"] = "noising", n_bootstrap: int = 1000,
                     seed: int = 0, fwd_hooks: Sequence = ()) -> CircuitEvaluation:  # fmt: skip
    """Faithfulness of `circuit` (its `in_circuit` edges) on `pairs`: see the module docstring."""
    table = circuit_metrics(model, [circuit], as_pairs(pairs, model), direction=direction, fwd_hooks=fwd_hooks)[0]
    value, ci = _ratio_of_means(table, n_bootstrap, seed)
    n_nodes = int(circuit.node_in_circuit.sum())
    return CircuitEvaluation(table, value, ci, circuit.n_edges_in_circuit, n_nodes, circuit.n_edges)


def faithfulness_curve(model, graph: Graph, pairs: CircuitPair | Sequence[CircuitPair], *,
                       fractions: Sequence[float] = MIB_FRACTIONS, by: Literal["abs", "signed"] = "signed",
                       method: Literal["topn", "greedy"] = "topn", direction: Literal["noising", "denoising"] = "noising",
                       fwd_hooks: Sequence = ()) -> FaithfulnessCurve:  # fmt: skip
    """f of the circuits of `fractions` of `graph`'s edges (top-n by `by`, pruned, as MIB's
    `evaluate_area_under_curve`); `.cpr` and `.cmd` are MIB's areas. Clean and corrupted runs are
    shared by every size: one plain forward each per pair, then one edge-masked forward per size."""
    circuits = curve_circuits(graph, fractions, by=by, method=method)
    tables = circuit_metrics(model, circuits, as_pairs(pairs, model), direction=direction, fwd_hooks=fwd_hooks)
    return curve_from_metrics(graph, fractions, circuits, tables, by=by, method=method, direction=direction)


def curve_circuits(graph: Graph, fractions: Sequence[float], *, by: str = "signed", method: str = "topn") -> list[Graph]:
    """The circuits of a faithfulness curve: the top `fractions` of `graph`'s edges, pruned."""
    fractions = [float(f) for f in fractions]
    if sorted(fractions) != fractions or not fractions or not 0 <= fractions[0] <= fractions[-1] <= 1:
        raise ValueError(f"fractions must be increasing and within [0, 1], got {fractions}")
    return [find_circuit(graph, fraction=f, method=method, by=by) for f in fractions]


def curve_from_metrics(graph: Graph, fractions: Sequence[float], circuits: list[Graph], tables: list[pd.DataFrame], *,
                       by: str, method: str, direction: str) -> FaithfulnessCurve:  # fmt: skip
    """The curve of `circuit_metrics` tables (one per circuit, rows of every pair): ratios of means."""
    m_clean, m_corrupted = tables[0]["m_clean"].mean(), tables[0]["m_corrupted"].mean()
    rows = []
    for fraction, circuit, table in zip(fractions, circuits, tables):
        m_circuit = table["m_circuit"].mean()
        rows.append({"fraction": float(fraction), "n_edges": int(fraction * graph.n_edges), "n_edges_kept": circuit.n_edges_in_circuit,
                     "n_nodes": int(circuit.node_in_circuit.sum()), "m_circuit": m_circuit,
                     "faithfulness": _normalised(m_circuit, m_clean, m_corrupted)})  # fmt: skip
    return FaithfulnessCurve(pd.DataFrame(rows), float(m_clean), float(m_corrupted), by, method,
                             {**graph.meta, "direction": direction})  # fmt: skip


def mib_scores(model, graph: Graph, pairs, **kwargs) -> dict[str, float]:
    """MIB's two numbers: CPR of the signed ranking and CMD of the |score| ranking."""
    return {"cpr": faithfulness_curve(model, graph, pairs, by="signed", **kwargs).cpr,
            "cmd": faithfulness_curve(model, graph, pairs, by="abs", **kwargs).cmd}  # fmt: skip


def area_under(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Trapezoids of f over the linear fraction axis (MIB's `area_under`: CPR)."""
    x, f = np.asarray(fractions, dtype=float), np.asarray(faithfulness, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (f[1:] + f[:-1]) / 2))


def area_from_one(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Trapezoids of |1 − f| (MIB's `area_from_1`: CMD)."""
    return area_under(fractions, np.abs(1.0 - np.asarray(faithfulness, dtype=float)))


def circuit_metrics(model, circuits: list[Graph], pairs: list[CircuitPair], *, direction: str = "noising",
                    fwd_hooks: Sequence = ()) -> list[pd.DataFrame]:  # fmt: skip
    """Per circuit, a table of m_clean, m_corrupted, m_circuit (and that row's faithfulness) for
    every row of every pair; the clean and corrupted runs are shared by the circuits."""
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    for circuit in circuits:
        circuit.check_model(model)
        if circuit.spans != span_names(pairs):
            raise ValueError(f"the circuit's spans {circuit.spans} differ from the pairs' {span_names(pairs)}")
    dtype = accumulation_dtype(model.dtype)
    structure = circuits[0].structure
    rows: list[list[dict]] = [[] for _ in circuits]
    for p, pair in enumerate(pairs):
        base, source = (pair.clean, pair.corrupted) if direction == "noising" else (pair.corrupted, pair.clean)
        embeds: list[Tensor] = []
        # a language-model graph's edge forwards start from the plain run's input embeddings: the
        # vision tower runs once per pair, not once per circuit
        keep = [] if "vision" in structure.towers else [("hook_inputs_embeds", lambda x, hook: embeds.append(x))]
        with torch.no_grad():
            base_logits = model.run_with_hooks(base, fwd_hooks=list(fwd_hooks) + keep)
            source_logits, source_src = source_outputs(model, source, structure, fwd_hooks)
            m_base = metric_values(pair.metric, base_logits.to(dtype)).double()
            m_source = metric_values(pair.metric, source_logits.to(dtype)).double()
            m_clean, m_corr = (m_base, m_source) if direction == "noising" else (m_source, m_base)
            span_index = None if pair.spans is None else pair.spans.index()
            for i, circuit in enumerate(circuits):
                keep = circuit.in_circuit & circuit.real_mask()
                weights = (~keep if direction == "noising" else keep) & circuit.real_mask()
                logits = edge_forward(model, base, structure, weights.to(dtype).to(model.device), source_src, span_index, fwd_hooks,
                                      embeds=embeds[0] if embeds else None)  # fmt: skip
                m_circuit = metric_values(pair.metric, logits.to(dtype)).double()
                for row in range(len(base)):
                    rows[i].append({"pair": pair.id or str(p), "row": row, "m_clean": float(m_clean[row]),
                                    "m_corrupted": float(m_corr[row]), "m_circuit": float(m_circuit[row])})  # fmt: skip
    tables = [pd.DataFrame(r) for r in rows]
    for table in tables:
        table["faithfulness"] = [_normalised(c, a, b) for c, a, b in zip(table["m_circuit"], table["m_clean"], table["m_corrupted"])]
    return tables


def _normalised(m_circuit: float, m_clean: float, m_corrupted: float, min_effect: float = 1e-9) -> float:
    gap = m_clean - m_corrupted
    if abs(gap) <= min_effect * max(abs(m_clean), abs(m_corrupted), 1e-30):
        return float("nan")  # the pair does not tell clean from corrupted: f is undefined
    return float((m_circuit - m_corrupted) / gap)


def _ratio_of_means(table: pd.DataFrame, n_bootstrap: int, seed: int) -> tuple[float, tuple[float, float]]:
    means = table[["m_circuit", "m_clean", "m_corrupted"]].to_numpy()
    value = _normalised(*means.mean(0))
    if n_bootstrap <= 0 or len(table) < 2:
        return value, (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(table), size=(n_bootstrap, len(table)))
    samples = np.array([_normalised(*means[d].mean(0)) for d in draws])
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return value, (float(low), float(high))
