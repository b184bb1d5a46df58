"""The circuit experiment and its figures: object-removed pairs, the tidy edge table, the
faithfulness table, and the plots drawn from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from hooked_vlm import HookedVLM, plotting
from hooked_vlm.circuits import VLM_SPANS, find_circuit
from hooked_vlm.circuits.pairs import composite_removed, object_removed_pairs
from hooked_vlm.experiments import circuit_faithfulness, edge_circuit
from hooked_vlm.experiments.edge_circuit import graph_from_table
from hooked_vlm.toy_models import toy_dataset


@pytest.fixture(scope="module")
def run():
    model = HookedVLM.from_pretrained("toy-llava")
    pairs = object_removed_pairs(model, toy_dataset("toy-llava", 2, split="test"), target="gt", spans=True)
    table = edge_circuit(model, pairs, steps=2, towers=("vision", "language"), progress=False)
    return model, pairs, table


def test_object_removed_pairs_differ_only_at_the_object(run):
    model, pairs, _ = run
    item = toy_dataset("toy-llava", 1, split="test")[0]
    twin = np.asarray(composite_removed(item.image, item.removed_image, item.mask, grow_px=2))
    grown = Image.fromarray(item.mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))  # 2 px around the object
    outside = ~np.asarray(grown).astype(bool)
    assert (twin[outside] == np.asarray(item.image)[outside]).all()
    assert (twin[item.mask] == np.asarray(item.removed_image)[item.mask]).all()
    pair = pairs[0]
    assert pair.spans.names == VLM_SPANS and pair.clean.layout.same_geometry(pair.corrupted.layout)
    with torch.no_grad():
        clean, corrupted = (pair.metric(model(x), 0).item() for x in (pair.clean, pair.corrupted))
    assert corrupted > clean + 1.0  # without the object the toy cannot say where it is


def test_edge_table_is_tidy_and_ranked(run):
    model, _, table = run
    assert {"edge", "parent", "child", "qkv", "span", "score", "rank", "rank_signed", "tower", "method", "steps",
            "towers", "kv", "n_pairs"} <= set(table.columns)  # fmt: skip
    assert list(table["rank"]) == list(range(1, len(table) + 1)) and table["score"].abs().is_monotonic_decreasing
    assert set(table["tower"]) == {"vision", "projector", "language"} and set(table["span"]) == set(VLM_SPANS)
    assert (table["towers"] == "vision+language").all() and (table["n_pairs"] == 2).all()
    graph = graph_from_table(model, table)
    assert graph.spans == VLM_SPANS and graph.n_edges == len(table)
    assert graph.scores[graph.edge_index(table["edge"].iloc[0])].item() == pytest.approx(table["score"].iloc[0])


def test_faithfulness_table_has_a_curve_per_ranking_with_mib_s_areas(run):
    model, pairs, table = run
    curves = circuit_faithfulness(model, pairs, table, fractions=(0.01, 0.1, 1.0))
    assert list(curves["ranking"].unique()) == ["signed", "abs"]
    assert curves.groupby("ranking")["faithfulness"].last().tolist() == pytest.approx([1.0, 1.0])
    assert curves[curves["ranking"] == "signed"]["cpr"].notna().all() and curves[curves["ranking"] == "abs"]["cmd"].notna().all()


def test_figures_draw_the_circuit_across_both_towers(run):
    model, pairs, table = run
    graph = graph_from_table(model, table)
    circuit = find_circuit(graph, n_edges=40)
    fig = plotting.circuit_graph(circuit)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"projector", "v.input", "logits"} & labels and len(fig.axes[0].patches) > 0
    maps = plotting.node_score_maps(graph)
    assert [ax.get_title() for ax in maps.axes if ax.get_title()][:2] == ["vision: Σ of each head's edge scores",
                                                                           "language: Σ of each head's edge scores"]  # fmt: skip
    flow = plotting.span_flow(graph)
    assert [t.get_text() for t in flow.axes[0].get_xticklabels()] == list(VLM_SPANS)
    curve = plotting.faithfulness_figure(circuit_faithfulness(model, pairs, graph, fractions=(0.1, 1.0)))
    assert len(curve.axes[0].lines) == 2 + 2  # two rankings, and the lines at 0 and 1


def test_figures_refuse_what_they_cannot_draw(run):
    model, _, table = run
    graph = graph_from_table(model, table)
    with pytest.raises(ValueError, match="has no edges to draw"):
        plotting.circuit_graph(find_circuit(graph, n_edges=0))
    plain = graph.copy()
    plain.spans = None
    with pytest.raises(ValueError, match="needs a graph with position spans"):
        plotting.span_flow(plain)


def test_readme_example_runs_as_written(run):
    from test_readme import run_example

    model, _, _ = run
    ns = run_example(
        "Circuits",
        {"faithfulness_curve(model, graph, pairs)": "faithfulness_curve(model, graph, pairs, fractions=(0.1, 1.0))",
         "object_removed_pairs(model, coco_pairs, spans=True)": "object_removed_pairs(model, coco_pairs, spans=True, target='gt')"},
        {"model": model, "coco_pairs": toy_dataset("toy-llava", 2, split="test")},
    )  # fmt: skip
    assert ns["graph"].spans == VLM_SPANS and 0 < ns["circuit"].n_edges_in_circuit <= 0.01 * ns["graph"].n_edges
    assert ns["curve"].table["faithfulness"].iloc[-1] == pytest.approx(1.0)
