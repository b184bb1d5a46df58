"""Reading and writing graphs in EAP-IG / MIB's files (`hannamw/EAP-IG`, `graph.py`).

Both formats describe a language model's graph (`cfg`: n_layers, n_heads, parallel_attn_mlp,
d_model): `.json` maps node names to `{"in_graph"}` and edge names to `{"score", "in_graph"}`;
`.pt` holds the dense `edges_scores` / `edges_in_graph` matrices with `src_nodes` / `dst_nodes`.
Graphs over the vision tower, with grouped key/value destinations or with spans have no such
file; `Graph.save` / `Graph.load` (a `.pt` of our own) keeps any graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hooked_vlm.runs import write_atomically
from hooked_vlm.circuits.graph import Graph
from hooked_vlm.circuits.structure import Structure, TowerShape, build_structure


def to_eap_json(graph: Graph, path: str | Path, *, d_model: int | None = None) -> Path:
    """Write EAP-IG's JSON (every node and edge, in EAP-IG's order). `d_model` (the language
    model's width) defaults to the graph's: EAP-IG's `Graph.from_json` cannot read a file without it."""
    _check_mib(graph)
    nodes = {name: {"in_graph": bool(graph.node_in_circuit[i])} for i, name in enumerate(graph.src_names)}
    nodes["logits"] = {"in_graph": True}
    edges = {}
    for src, dst in _eap_edge_order(graph):
        name = f"{graph.src_names[src]}->{graph.dst_names[dst]}"
        edges[name] = {"score": float(graph.scores[src, dst]), "in_graph": bool(graph.in_circuit[src, dst])}
    data = {"cfg": _cfg(graph, d_model), "nodes": nodes, "edges": edges}
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data)))


def from_eap_json(path: str | Path) -> Graph:
    """A graph from EAP-IG's JSON; an edge or node name this graph does not have is an error."""
    data = json.loads(Path(path).read_text())
    missing = {"cfg", "nodes", "edges"} - set(data)
    if missing:
        raise ValueError(f"{path}: not an EAP-IG graph file (missing {sorted(missing)})")
    graph = _empty(data["cfg"], path)
    for name, info in data["edges"].items():
        try:
            index = graph.edge_index(name)
        except KeyError as error:
            raise ValueError(f"{path}: {error.args[0]}") from None
        graph.scores[index] = float(info["score"])
        graph.in_circuit[index] = bool(info["in_graph"])
    for name, info in data["nodes"].items():
        if name != "logits":
            try:
                graph.node_in_circuit[graph.src_index(name)] = bool(info["in_graph"])
            except KeyError as error:
                raise ValueError(f"{path}: {error.args[0]}") from None
    return graph


def to_eap_pt(graph: Graph, path: str | Path, *, d_model: int | None = None) -> Path:
    """Write EAP-IG's `.pt` (dense score and membership matrices, fp32); `d_model` as `to_eap_json`."""
    _check_mib(graph)
    data = {"cfg": _cfg(graph, d_model), "src_nodes": list(graph.src_names), "dst_nodes": list(graph.dst_names),
            "edges_scores": graph.scores.float().clone(), "edges_in_graph": graph.in_circuit.clone(),
            "nodes_in_graph": graph.node_in_circuit.clone()}  # fmt: skip
    return write_atomically(path, lambda tmp: torch.save(data, tmp))


def from_eap_pt(path: str | Path) -> Graph:
    data = torch.load(path, weights_only=True)
    missing = {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"} - set(data)
    if missing:
        raise ValueError(f"{path}: not an EAP-IG graph file (missing {sorted(missing)})")
    graph = _empty(data["cfg"], path)
    if list(data["src_nodes"]) != graph.src_names or list(data["dst_nodes"]) != graph.dst_names:
        raise ValueError(f"{path}: node names or order differ from EAP-IG's for {data['cfg']}")
    graph.scores = data["edges_scores"].float().clone()
    graph.in_circuit = data["edges_in_graph"].bool().clone()
    graph.node_in_circuit = data["nodes_in_graph"].bool().clone()
    return graph


def save_graph(graph: Graph, path: str | Path) -> Path:
    """Any graph (both towers, grouped key/values, spans), with its scores, circuit and meta."""
    data = {"format": "hooked_vlm.circuits.graph/1", "structure": graph.structure.describe(), "spans": graph.spans,
            "scores": graph.scores, "in_circuit": graph.in_circuit, "node_in_circuit": graph.node_in_circuit,
            "meta": json.dumps(graph.meta, default=str), "d_model": graph.d_model}  # fmt: skip
    return write_atomically(path, lambda tmp: torch.save(data, tmp))


def load_graph(path: str | Path) -> Graph:
    data = torch.load(path, weights_only=True)
    if data.get("format") != "hooked_vlm.circuits.graph/1":
        raise ValueError(f"{path}: not a graph written by save_graph (for EAP-IG files use from_eap_json / from_eap_pt)")
    described = data["structure"]
    shapes = {tower: TowerShape(**shape) for tower, shape in described["shapes"].items()}
    graph = Graph(build_structure(shapes, described["towers"], described["kv"]), data["spans"])
    graph.scores, graph.in_circuit, graph.node_in_circuit = data["scores"], data["in_circuit"], data["node_in_circuit"]
    graph.meta = json.loads(data["meta"])
    graph.d_model = data.get("d_model")  # absent from files written before it was kept
    return graph


def _check_mib(graph: Graph) -> None:
    s: Structure = graph.structure
    if s.towers != ("language",) or graph.spans is not None or (s.kv == "grouped" and _grouped(s)):
        raise ValueError("EAP-IG / MIB files hold language-model graphs with ungrouped key/values and no spans; "
                         "use save_graph for this one")  # fmt: skip


def _grouped(s: Structure) -> bool:
    shape = s.shapes["language"]
    return shape.n_key_value_heads != shape.n_heads


def _cfg(graph: Graph, d_model: int | None) -> dict:
    d_model = d_model if d_model is not None else graph.d_model
    if d_model is None:
        raise ValueError("EAP-IG's files need the language model's d_model in their cfg and this graph does not know it "
                         "(built without a model): pass d_model=")  # fmt: skip
    if graph.d_model is not None and d_model != graph.d_model:
        raise ValueError(f"d_model={d_model} but the graph was built for a language model of width {graph.d_model}")
    shape = graph.structure.shapes["language"]
    return {"n_layers": shape.n_layers, "n_heads": shape.n_heads, "parallel_attn_mlp": False, "d_model": int(d_model)}


def _empty(cfg: dict, path) -> Graph:
    if cfg.get("parallel_attn_mlp"):
        raise ValueError(f"{path}: graphs of models with parallel attention and MLP are not supported")
    d_model = cfg.get("d_model")
    graph = Graph.from_shapes(int(cfg["n_layers"]), int(cfg["n_heads"]), d_model=None if d_model is None else int(d_model))
    graph.in_circuit[:] = False
    graph.node_in_circuit[:] = False
    return graph


def _eap_edge_order(graph: Graph) -> list[tuple[int, int]]:
    """EAP-IG's `from_model` order: per layer, each upstream node (in source order) to each
    head's q, k and v, then each upstream node to the MLP; finally every node to the logits."""
    s = graph.structure
    by_key = {(span.key, span.layer): span for span in s.destinations}
    heads = {span.layer: span for span in s.sources if span.key == "heads"}
    order = []
    for layer in range(s.shapes["language"].n_layers):
        q, k, v, mlp = (by_key[key, layer] for key in ("q", "k", "v", "mlp"))
        for src in range(heads[layer].start):
            for h in range(len(q)):
                order += [(src, q.start + h), (src, k.start + h), (src, v.start + h)]
        order += [(src, mlp.start) for src in range(heads[layer].stop)]
    return order + [(src, s.sink().start) for src in range(s.n_src)]
