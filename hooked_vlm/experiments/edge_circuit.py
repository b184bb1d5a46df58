"""`edge_circuit`: which edges carry the object's effect, and how faithful their circuits are.

For each object-removed pair (clean = the image, corrupted = its object-removed twin composited
onto it; the teacher-forced answer scored by the masked NLL of its decisive tokens, as
`head_mediation`), every edge of the graph is scored (`hooked_vlm.circuits.edge_attribution`,
EAP-IG by default) and the scores are averaged over the pairs. `circuit_faithfulness` then runs
the top circuits at MIB's edge fractions with every other edge corrupted and reports the
normalised faithfulness, CPR and CMD.

`edge_circuit` columns: `edge` (EAP-IG's name, '@span' with spans), `parent`, `child`, `qkv`,
`span`, `score` (mean first-order change of the NLL when the edge is corrupted; > 0: the edge
lowers the NLL of the answer, i.e. carries the object's help), `rank` (by |score|, 1 = first),
`rank_signed`, `tower` (of the child: "vision", "projector" or "language"), and the settings:
`method`, `steps`, `task`, `towers`, `kv`, `n_pairs`.
`circuit_faithfulness` columns: `ranking` ("signed", MIB's CPR; "abs", CMD), `fraction`,
`n_edges`, `n_edges_kept`, `n_nodes`, `m_circuit`, `m_clean`, `m_corrupted`, `faithfulness`,
and the ranking's `cpr` or `cmd`.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from hooked_vlm.circuits import MIB_FRACTIONS, CircuitPair, Graph, edge_attribution, faithfulness_curve
from hooked_vlm.circuits.pairs import object_removed_pairs
from hooked_vlm.circuits.spans import VLM_SPANS


def edge_circuit(
    model,
    data: Any,
    *,
    task: str = "localization",
    method: str = "EAP-IG",
    steps: int | None = None,
    towers: Sequence[str] = ("language",),
    kv: str = "ungrouped",
    spans: bool = False,
    dilation: int = 0,
    target: str = "src_greedy",
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Every edge's attribution score averaged over the pairs (module docstring). `data`: a
    list of `CircuitPair`, or a dataset with object-removed twins (`object_removed_pairs`)."""
    pairs = as_circuit_pairs(model, data, task=task, target=target, spans=spans, dilation=dilation, limit=limit)
    graph = edge_attribution(model, pairs, method=method, steps=steps, towers=towers, kv=kv, progress=progress)
    table = graph.edges()
    table["rank"] = range(1, len(table) + 1)
    table["rank_signed"] = table["score"].rank(ascending=False, method="first").astype(int)
    table["tower"] = [_tower(child) for child in table["child"]]
    settings = {"method": method, "steps": graph.meta["steps"], "task": task, "towers": "+".join(graph.structure.towers),
                "kv": kv, "n_pairs": len(pairs)}  # fmt: skip
    return table.drop(columns="in_circuit").assign(**settings)


def circuit_faithfulness(
    model,
    data: Any,
    edges: pd.DataFrame | Graph,
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    rankings: Sequence[str] = ("signed", "abs"),
    task: str = "localization",
    target: str = "src_greedy",
    dilation: int = 0,
    limit: int | None = None,
) -> pd.DataFrame:
    """Faithfulness of the top circuits of `edges` (an `edge_circuit` table or a scored graph)
    at each fraction, per ranking, with MIB's CPR (signed) and CMD (abs) of each curve."""
    graph = edges if isinstance(edges, Graph) else graph_from_table(model, edges)
    pairs = as_circuit_pairs(model, data, task=task, target=target, spans=graph.spans is not None, dilation=dilation, limit=limit)
    rows = []
    for ranking in rankings:
        curve = faithfulness_curve(model, graph, pairs, fractions=fractions, by=ranking)
        area = {"cpr": curve.cpr} if ranking == "signed" else {"cmd": curve.cmd}
        rows.append(curve.table.assign(ranking=ranking, m_clean=curve.m_clean, m_corrupted=curve.m_corrupted, **area))
    table = pd.concat(rows, ignore_index=True)
    return table[["ranking"] + [c for c in table.columns if c != "ranking"]]


def as_circuit_pairs(model, data: Any, *, spans: bool, limit: int | None = None, **kwargs) -> list[CircuitPair]:
    if isinstance(data, CircuitPair):
        return [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, CircuitPair) for p in data):
        return list(data)[:limit]
    return object_removed_pairs(model, data, spans=spans, limit=limit, **kwargs)


def graph_from_table(model, table: pd.DataFrame) -> Graph:
    """The scored graph an `edge_circuit` table describes (its `towers`, `kv` and spans)."""
    missing = {"edge", "score", "towers", "kv"} - set(table.columns)
    if missing:
        raise ValueError(f"not an edge_circuit table: missing columns {sorted(missing)}")
    span_values = [s for s in table.get("span", pd.Series(dtype=object)).dropna().unique()]
    spans = None if not span_values else tuple(s for s in VLM_SPANS if s in span_values) + tuple(
        s for s in span_values if s not in VLM_SPANS
    )
    graph = Graph.from_model(model, towers=table["towers"].iloc[0].split("+"), kv=table["kv"].iloc[0], spans=spans)
    graph.scores[:] = float("nan")
    for name, score in zip(table["edge"], table["score"]):
        graph.scores[graph.edge_index(name)] = float(score)
    return graph


def _tower(child: str) -> str:
    if child == "projector":
        return "projector"
    return "vision" if child.startswith("v.") else "language"
