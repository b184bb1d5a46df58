"""`edge_circuit`: which edges carry the object's effect, and how faithful their circuits are.

For each object-removed pair (clean = the image, corrupted = its object-removed twin composited
onto it; the teacher-forced answer scored by the masked NLL of its decisive tokens, as
`head_mediation`), every edge of the graph is scored (`hooked_vlm.circuits.edge_attribution`,
EAP-IG by default) and the scores are averaged over the pairs. `circuit_faithfulness` then runs
the top circuits at MIB's edge fractions with every other edge corrupted and reports the
normalised faithfulness, CPR and CMD.

Both are long runs on a real model (`run=`, `hooked_vlm.runs`): one item per pair. An item of
`edge_circuit` records that pair's score of every edge (fp32, base64 in the row); the table is
their mean, weighted by the pair's rows, summed in the pairs' order — so a resumed run, or one
shared by the processes of `accelerate launch`, gives the table of one uninterrupted process.
An item of `circuit_faithfulness` records the pair's clean, corrupted and circuit metrics.

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

import base64
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from hooked_vlm.circuits import MIB_FRACTIONS, CircuitPair, Graph, edge_attribution
from hooked_vlm.circuits.attribute import ig_alphas
from hooked_vlm.circuits.evaluate import circuit_metrics, curve_circuits, curve_from_metrics
from hooked_vlm.circuits.pairs import object_removed_pair
from hooked_vlm.circuits.spans import VLM_SPANS
from hooked_vlm.experiments.data import SampleMode, Sources, sample_sources
from hooked_vlm.runs import Item, Run, Work, describe_ids, execute

AGGREGATIONS = ("mean", "mean_abs")


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
    aggregation: str = "mean",
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    progress: bool = True,
    run: Run | str | None = None,
) -> pd.DataFrame:
    """Every edge's attribution score averaged over the pairs (module docstring). `data`: a
    list of `CircuitPair`, or a dataset with object-removed twins (`object_removed_pairs`).
    `aggregation="mean_abs"` averages each pair's |score|. `run`: a run directory to record each
    pair's scores in and resume from (`hooked_vlm.runs`). `limit`, `sample`, `sample_seed`: which
    pairs (`experiments.data.sample_sources`: a seeded random subset of `limit` by default)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r} (expected one of {AGGREGATIONS})")
    resolved_steps = None if method == "exact" else len(ig_alphas(method, steps, None))
    items = pair_items(model, data, task=task, target=target, spans=spans, dilation=dilation, limit=limit, sample=sample,
                       sample_seed=sample_seed)  # fmt: skip
    template = Graph.from_model(model, towers=towers, kv=kv)  # checks towers and kv before any pair is scored

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        for item in pending:
            pair = item.payload()
            graph = edge_attribution(model, [pair], method=method, steps=steps, towers=towers, kv=kv, progress=False)
            scores = graph.scores[graph.real_mask()]
            scores = scores.abs() if aggregation == "mean_abs" else scores
            yield item.key, [{"pair_id": item.key, "n_rows": len(pair), "spans": graph.spans, "scores": _encode(scores)}]

    def table(rows_per_item: list[list[dict]]) -> pd.DataFrame:
        rows = [rows[0] for rows in rows_per_item]
        graph = Graph.from_model(model, towers=template.structure.towers, kv=kv, spans=rows[0]["spans"])
        total = torch.zeros(int(graph.real_mask().sum()), dtype=torch.float64)
        for row in rows:  # in the pairs' order, whichever process computed them
            total += _decode(row["scores"], len(total)) * row["n_rows"]
        graph.scores = torch.zeros(graph.scores.shape, dtype=torch.float32)
        graph.scores[graph.real_mask()] = (total / sum(row["n_rows"] for row in rows)).float()
        edges = graph.edges()
        edges["rank"] = range(1, len(edges) + 1)
        edges["rank_signed"] = edges["score"].rank(ascending=False, method="first").astype(int)
        edges["tower"] = [_tower(child) for child in edges["child"]]
        settings = {"method": method, "steps": resolved_steps, "task": task, "towers": "+".join(graph.structure.towers),
                    "kv": kv, "n_pairs": len(rows)}  # fmt: skip
        return edges.drop(columns="in_circuit").assign(**settings)

    settings = {"task": task, "method": method, "steps": resolved_steps, "towers": list(template.structure.towers), "kv": kv,
                "spans": spans, "dilation": dilation, "target": target, "aggregation": aggregation, "limit": limit,
                "sample": sample, "sample_seed": sample_seed, "data": items.data}  # fmt: skip
    work = Work("edge_circuit", items, compute, table, settings=settings, model=model, desc=f"edge attribution ({method})",
                unit="pair")  # fmt: skip
    return execute(work, run, progress=progress)


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
    sample: SampleMode = "random",
    sample_seed: int = 0,
    progress: bool = True,
    run: Run | str | None = None,
) -> pd.DataFrame:
    """Faithfulness of the top circuits of `edges` (an `edge_circuit` table or a scored graph)
    at each fraction, per ranking, with MIB's CPR (signed) and CMD (abs) of each curve. The
    clean and corrupted runs of a pair are shared by every circuit of both rankings."""
    graph = edges if isinstance(edges, Graph) else graph_from_table(model, edges)
    unknown = set(rankings) - {"signed", "abs"}
    if unknown or not rankings:
        raise ValueError(f"rankings must be among 'signed' and 'abs', got {list(rankings)}")
    circuits = {ranking: curve_circuits(graph, fractions, by=ranking) for ranking in rankings}
    every = [circuit for ranking in rankings for circuit in circuits[ranking]]
    items = pair_items(model, data, task=task, target=target, spans=graph.spans is not None, dilation=dilation, limit=limit,
                       sample=sample, sample_seed=sample_seed)  # fmt: skip

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        for item in pending:
            tables = circuit_metrics(model, every, [item.payload()])
            yield item.key, [{"circuit": i, **row} for i, table in enumerate(tables) for row in table.to_dict("records")]

    def table(rows_per_item: list[list[dict]]) -> pd.DataFrame:
        rows = pd.DataFrame([row for rows in rows_per_item for row in rows])
        tables = [rows[rows["circuit"] == i].drop(columns="circuit") for i in range(len(every))]
        parts = []
        for r, ranking in enumerate(rankings):
            own = tables[r * len(fractions) : (r + 1) * len(fractions)]
            curve = curve_from_metrics(graph, fractions, circuits[ranking], own, by=ranking, method="topn", direction="noising")
            area = {"cpr": curve.cpr} if ranking == "signed" else {"cmd": curve.cmd}
            parts.append(curve.table.assign(ranking=ranking, m_clean=curve.m_clean, m_corrupted=curve.m_corrupted, **area))
        out = pd.concat(parts, ignore_index=True)
        return out[["ranking"] + [c for c in out.columns if c != "ranking"]]

    settings = {"fractions": [float(f) for f in fractions], "rankings": list(rankings), "task": task, "target": target,
                "dilation": dilation, "limit": limit, "sample": sample, "sample_seed": sample_seed, "data": items.data,
                "graph": _graph_digest(graph)}  # fmt: skip
    work = Work("circuit_faithfulness", items, compute, table, settings=settings, model=model, desc="circuit faithfulness",
                unit="pair")  # fmt: skip
    return execute(work, run, progress=progress)


def pair_items(model, data: Any, *, task: str, target: str, spans: bool, dilation: int, limit: int | None,
               sample: SampleMode = "random", sample_seed: int = 0) -> Sources:  # fmt: skip
    """One item per pair, keyed by its id: given `CircuitPair`s (the first `limit`), or
    object-removed pairs chosen by `sample_sources` and built (target answer generated, images
    composited) only when the item is computed. `.data` describes them for a run's manifest."""
    if task not in ("localization", "binary"):
        raise ValueError(f"object-removed pairs support task 'localization' or 'binary', got {task!r}")
    if isinstance(data, CircuitPair):
        data = [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, CircuitPair) for p in data):
        pairs = list(data)[:limit]
        ids = [pair.id or f"pair-{i}" for i, pair in enumerate(pairs)]
        return Sources([Item(i, i, lambda pair=pair: pair) for i, pair in zip(ids, pairs)], {"circuit_pairs": describe_ids(ids)})

    def build(load: Callable) -> Callable[[], CircuitPair]:
        return lambda: object_removed_pair(model, load(), task=task, target=target, spans=spans, dilation=dilation)

    sources = sample_sources(data, limit, sample=sample, sample_seed=sample_seed)
    return Sources([Item(sample_id, sample_id, build(load)) for sample_id, load in sources], sources.data)


def as_circuit_pairs(model, data: Any, *, task: str = "localization", target: str = "src_greedy", spans: bool = False,
                     dilation: int = 0, limit: int | None = None, sample: SampleMode = "random",
                     sample_seed: int = 0) -> list[CircuitPair]:  # fmt: skip
    """The pairs `edge_circuit` scores, built now (for `evaluate_circuit` and the like)."""
    items = pair_items(model, data, task=task, target=target, spans=spans, dilation=dilation, limit=limit, sample=sample,
                       sample_seed=sample_seed)  # fmt: skip
    return [item.payload() for item in items]


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


def _encode(scores: torch.Tensor) -> str:
    """A pair's scores as a plain value a run records: fp32 little-endian bytes, base64 (a
    7B language model's 1.6 M edges: 8.5 MB per pair, a quarter of JSON numbers)."""
    return base64.b64encode(scores.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text: str, n: int) -> torch.Tensor:
    values = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if len(values) != n:
        raise ValueError(f"a recorded pair has {len(values)} edge scores, this graph {n}: the run was made on another graph")
    return torch.from_numpy(values.astype(np.float64))


def _graph_digest(graph: Graph) -> dict:
    """What the run manifest records of the ranked graph: a resume with other scores is refused."""
    import hashlib

    scores = graph.scores.double().nan_to_num(0.0).numpy().tobytes()
    return {"towers": list(graph.structure.towers), "spans": graph.spans, "n_edges": graph.n_edges,
            "scores_sha256": hashlib.sha256(scores).hexdigest()}  # fmt: skip


def _tower(child: str) -> str:
    if child == "projector":
        return "projector"
    return "vision" if child.startswith("v.") else "language"
