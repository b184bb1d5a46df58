"""Figures of edge-level circuits (`hooked_vlm.circuits`), drawn with matplotlib's object API.

- `circuit_graph`: a circuit as a graph across both towers: the vision tower at the bottom, the
  projector, the language model above it, the logits on top; heads of a layer side by side with
  its MLP at the right; edges coloured by sign, as thick as their |score|, dashed into keys and
  dotted into values.
- `node_score_maps`: each tower's layer x head map of node scores (Σ of a head's edge scores:
  first order, the effect of corrupting the head).
- `span_flow`: with position spans, how much score enters each layer's inputs at each span.
- `faithfulness_figure`: MIB's faithfulness curves with their CPR / CMD.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from hooked_vlm.circuits.graph import Graph
from hooked_vlm.plotting.charts import _figure_and_axes, _show_matrix, _value_norm, head_heatmap

QKV_STYLE = {"q": "solid", "k": "dashed", "v": "dotted", None: "solid"}


def circuit_graph(circuit: Graph, *, max_edges: int = 150, title: str | None = None, ax=None) -> Figure:
    """The circuit's edges (`in_circuit`; the `max_edges` of largest |score| if more), nodes
    placed by tower, layer and head. Span-resolved edges are summed over their kept spans."""
    edges = circuit.edges(in_circuit=True)
    if edges.empty:
        raise ValueError("the circuit has no edges to draw (find_circuit selects them)")
    edges = edges.groupby(["parent", "child", "qkv"], dropna=False, sort=False)["score"].sum().reset_index()
    edges = edges.reindex(edges["score"].abs().sort_values(ascending=False).index)[:max_edges]
    place = _placement(circuit)
    fig, ax = _figure_and_axes(ax, figsize=(9.0, max(4.0, 0.55 * max(y for _, y in place.values()) + 2)))
    scale = float(edges["score"].abs().max()) or 1.0
    for parent, child, qkv, score in edges.itertuples(index=False, name=None):
        qkv = qkv if isinstance(qkv, str) else None
        arrow = FancyArrowPatch(place[parent], place[child], arrowstyle="-|>", mutation_scale=7,
                                connectionstyle="arc3,rad=0.12", linestyle=QKV_STYLE[qkv],
                                color="tab:red" if score > 0 else "tab:blue", linewidth=0.4 + 3.0 * abs(score) / scale,
                                alpha=0.75, shrinkA=4, shrinkB=4)  # fmt: skip
        ax.add_patch(arrow)
    drawn = set(edges["parent"]) | set(edges["child"])
    for name in drawn:
        x, y = place[name]
        special = not re.fullmatch(r"(v\.)?[am]\d+\.?.*", name)
        ax.scatter([x], [y], s=90 if special else 40, color="0.2" if special else "0.45", zorder=3)
        ax.annotate(_label(name), (x, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=6.5)
    _tower_labels(ax, circuit, place)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.autoscale_view()
    ax.margins(0.08)
    ax.legend(handles=[Line2D([], [], color="tab:red", label="score > 0"), Line2D([], [], color="tab:blue", label="score < 0"),
                       Line2D([], [], color="0.3", linestyle="dashed", label="into a key"),
                       Line2D([], [], color="0.3", linestyle="dotted", label="into a value")],
              fontsize=7, loc="upper left", frameon=False)  # fmt: skip
    ax.set_title(title or f"circuit: {circuit.n_edges_in_circuit} of {circuit.n_edges} edges" +
                 (f" (the {max_edges} largest drawn)" if circuit.n_edges_in_circuit > max_edges else ""))  # fmt: skip
    return fig


def node_score_maps(graph: Graph, *, title: str | None = None) -> Figure:
    """A layer x head map of node scores for each tower in the graph, side by side."""
    towers = [t for t in ("vision", "language") if t in graph.structure.towers]
    fig = Figure(figsize=(5.5 * len(towers), 4.0), layout="constrained")
    axes = fig.subplots(1, len(towers), squeeze=False)[0]
    for ax, tower in zip(axes, towers):
        head_heatmap(graph.head_scores(tower), ax=ax, signed=True, annotate_top=3, colorbar_label="node score",
                     title=f"{tower}: Σ of each head's edge scores")  # fmt: skip
    if title:
        fig.suptitle(title)
    return fig


def span_flow(graph: Graph, *, title: str | None = None, ax=None) -> Figure:
    """Rows: the layers whose inputs the scores enter (vision layers, the projector, language-model
    layers, the logits); columns: spans; cells: Σ of the edge scores at that span."""
    if graph.spans is None:
        raise ValueError("span_flow needs a graph with position spans (pairs made with Spans)")
    rows, labels = [], []
    for span in graph.structure.destinations:
        if span.key in ("k", "v", "mlp"):  # one row per layer: its q group starts it
            continue
        layer_groups = [s for s in graph.structure.destinations if s.tower == span.tower and s.layer == span.layer]
        total = sum(np.nan_to_num(graph.scores[:, s.slice].double().numpy()).sum(axis=(0, 1)) for s in layer_groups)
        rows.append(total)
        labels.append(span.key if span.key in ("logits", "projector") else f"{'v.' if span.tower == 'vision' else ''}L{span.layer}")
    data = np.array(rows)[::-1]
    fig, ax = _figure_and_axes(ax, figsize=(1.1 * len(graph.spans) + 2.5, 0.3 * len(rows) + 1.5))
    image = _show_matrix(ax, data, "RdBu_r", _value_norm(data, signed=True))
    ax.set_xticks(range(len(graph.spans)), list(graph.spans), rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set_xlabel("span of the positions")
    ax.set_ylabel("inputs of")
    fig.colorbar(image, ax=ax, label="Σ edge score")
    ax.set_title(title or "where the effect enters, by span")
    return fig


def faithfulness_figure(curves: pd.DataFrame, *, title: str | None = None, ax=None) -> Figure:
    """Faithfulness against the fraction of edges kept (log axis), one line per `ranking` of a
    `circuit_faithfulness` table (or a `FaithfulnessCurve.table`), labelled with CPR / CMD."""
    fig, ax = _figure_and_axes(ax, figsize=(5.5, 3.8))
    curves = curves if "ranking" in curves else curves.assign(ranking="")
    for ranking, rows in curves.groupby("ranking", sort=False):
        area = next((f"{k.upper()} {rows[k].iloc[0]:.3f}" for k in ("cpr", "cmd") if k in rows and rows[k].notna().any()), "")
        label = ", ".join(x for x in (str(ranking), area) if x)
        ax.plot(rows["fraction"], rows["faithfulness"], marker="o", markersize=3, label=label or None)
    for level in (0.0, 1.0):
        ax.axhline(level, color="0.6", linewidth=0.8, linestyle="dashed")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges in the circuit")
    ax.set_ylabel("normalised faithfulness")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "faithfulness of the top circuits")
    return fig


# ----------------------------------------------------------------------------- layout
def _placement(graph: Graph) -> dict[str, tuple[float, float]]:
    """(x, y) of every node and destination name: towers stacked, x spread over a common width."""
    place: dict[str, tuple[float, float]] = {}
    width, y0 = 10.0, 0.0
    for tower in ("vision", "language"):
        shape = graph.structure.shapes.get(tower)
        if shape is None:
            continue
        p = "v." if tower == "vision" else ""
        place[f"{p}input"] = (width / 2, y0)
        for layer in range(shape.n_layers):
            y = y0 + 1 + layer
            for head in range(shape.n_heads):
                x = head * (width - 1.5) / max(shape.n_heads - 1, 1)
                place[f"{p}a{layer}.h{head}"] = (x, y)
            for group in range(shape.n_key_value_heads):
                heads = [place[f"{p}a{layer}.h{h}"][0] for h in range(shape.n_heads) if h * shape.n_key_value_heads // shape.n_heads == group]
                place[f"{p}a{layer}.kv{group}"] = (float(np.mean(heads)), y)
            place[f"{p}m{layer}"] = (width, y)
        y0 += shape.n_layers + 1
        if tower == "vision":
            place["projector"] = (width / 2, y0)
            y0 += 1
    place["logits"] = (width / 2, y0)
    return place


def _label(name: str) -> str:
    match = re.fullmatch(r"(v\.)?a(\d+)\.(h|kv)(\d+)", name)
    if match:
        return f"{'v' if match[1] else ''}L{match[2]}{'H' if match[3] == 'h' else 'KV'}{match[4]}"
    return name


def _tower_labels(ax, graph: Graph, place: dict) -> None:
    for tower in graph.structure.towers:
        p = "v." if tower == "vision" else ""
        x, y = place[f"{p}input"]
        ax.annotate(f"{tower} tower", (-0.8, y + graph.structure.shapes[tower].n_layers / 2), rotation=90,
                    ha="center", va="center", fontsize=8, color="0.4")  # fmt: skip
