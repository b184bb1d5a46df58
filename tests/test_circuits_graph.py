"""The graph: EAP-IG's names, order and edge counts, MIB's files, and choosing circuits (top-n,
greedy, threshold, pruning) on small hand-made score matrices."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.circuits import Graph, find_circuit, from_eap_json, from_eap_pt, load_graph, prune_circuit, save_graph
from hooked_vlm.circuits import to_eap_json, to_eap_pt
from hooked_vlm.circuits.structure import TowerShape, build_structure


@pytest.mark.parametrize(
    ("shape", "towers", "kv", "edges"),
    [
        ((12, 12, 12), ("language",), "ungrouped", 32_491),  # GPT-2 small: EAP-IG's faithfulness plots' denominator
        ((32, 32, 32), ("language",), "ungrouped", 1_592_881),  # LLaVA-1.5-7B's language model
        ((36, 32, 8), ("language",), "ungrouped", 2_022_463),  # InternVL3.5-8B, GQA ungrouped (MIB)
        ((36, 32, 8), ("language",), "grouped", 1_022_815),  # ... key/value destinations per KV head
        ((4, 4, 4), ("language",), "ungrouped", 479),  # toy-llava's language model
        ((23, 16, 16), ("vision",), "ungrouped", 212_636),  # CLIP as LLaVA runs it (layer -2), into the projector
    ],
)
def test_edge_counts_match_eap_ig(shape, towers, kv, edges):
    shapes = {towers[0]: TowerShape(*shape)}
    assert int(build_structure(shapes, towers, kv).real().sum()) == edges


def test_language_model_names_and_order_are_eap_ig_s():
    graph = Graph.from_shapes(2, 2)
    assert graph.src_names == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert graph.dst_names == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0",
                               "a1.h0<q>", "a1.h1<q>", "a1.h0<k>", "a1.h1<k>", "a1.h0<v>", "a1.h1<v>", "m1", "logits"]  # fmt: skip
    real = graph.real
    assert real[graph.src_index("a0.h1"), graph.dst_index("m0")]  # an MLP reads its own layer's heads
    assert not real[graph.src_index("a0.h1"), graph.dst_index("a0.h0<q>")]  # a head does not read its own layer's
    assert not real[graph.src_index("m1"), graph.dst_index("m0")]


def test_both_towers_meet_only_through_the_projector(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    graph = Graph.from_model(model, towers=("vision", "language"))
    vision_heads = [i for i, name in enumerate(graph.src_names) if name.startswith("v.a")]
    lm_dsts = [i for i, name in enumerate(graph.dst_names) if not name.startswith("v.") and name != "projector"]
    assert not graph.real[vision_heads][:, lm_dsts].any()
    assert graph.real[graph.src_index("v.m1"), graph.dst_index("projector")]
    assert graph.real[graph.src_index("projector"), graph.dst_index("a0.h0<v>")]
    assert graph.n_edges == sum(Graph.from_model(model, towers=(t,)).n_edges for t in ("vision", "language")) + (
        graph.n_dst - graph.dst_index("projector") - 1
    )  # plus the projector's edges into every language-model destination


def test_grouped_key_values_are_destinations_per_kv_head():
    graph = Graph.from_shapes(1, 4, 2, kv="grouped")
    assert graph.dst_names[:8] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.kv0<k>", "a0.kv1<k>", "a0.kv0<v>", "a0.kv1<v>"]
    owner = graph.owner
    assert owner[graph.src_index("a0.h1"), graph.dst_index("a0.kv0<k>")] and not owner[graph.src_index("a0.h2"), graph.dst_index("a0.kv0<k>")]


def test_eap_json_round_trips_and_has_eap_ig_s_layout(tmp_path):
    graph = _scored(Graph.from_shapes(2, 2), seed=1)
    circuit = find_circuit(graph, n_edges=6)
    path = to_eap_json(circuit, tmp_path / "g.json", d_model=16)
    data = json.loads(path.read_text())
    assert data["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 16}
    assert list(data["edges"])[:4] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert list(data["edges"])[-1] == "m1->logits" and data["nodes"]["logits"] == {"in_graph": True}
    back = from_eap_json(path)
    assert torch.equal(back.in_circuit, circuit.in_circuit) and torch.equal(back.node_in_circuit, circuit.node_in_circuit)
    assert torch.allclose(back.scores[back.real], circuit.scores[circuit.real])


def test_eap_files_of_a_model_s_graph_carry_its_d_model(tiny_checkpoint, tmp_path):
    # EAP-IG's Graph.from_json builds neuron-level tensors [n_forward, cfg["d_model"]]: no d_model, no reading
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    graph = Graph.from_model(model)
    assert json.loads(to_eap_json(graph, tmp_path / "g.json").read_text())["cfg"]["d_model"] == model.cfg.text.d_model
    assert torch.load(to_eap_pt(graph, tmp_path / "g.pt"))["cfg"]["d_model"] == model.cfg.text.d_model
    assert from_eap_json(tmp_path / "g.json").d_model == model.cfg.text.d_model
    assert load_graph(save_graph(find_circuit(graph, n_edges=5), tmp_path / "c.pt")).d_model == model.cfg.text.d_model
    with pytest.raises(ValueError, match="need the language model's d_model"):
        to_eap_json(Graph.from_shapes(2, 2), tmp_path / "h.json")


def test_eap_pt_round_trips(tmp_path):
    circuit = find_circuit(_scored(Graph.from_shapes(3, 2), seed=2), fraction=0.2)
    back = from_eap_pt(to_eap_pt(circuit, tmp_path / "g.pt", d_model=8))
    assert torch.equal(back.scores, circuit.scores) and torch.equal(back.in_circuit, circuit.in_circuit)


def test_any_graph_round_trips_through_save_graph(tmp_path):
    graph = _scored(Graph(build_structure({"vision": TowerShape(2, 2, 2), "language": TowerShape(2, 4, 2)},
                                          ("vision", "language"), "grouped"), spans=("object", "rest")), seed=3)  # fmt: skip
    graph.meta = {"method": "EAP-IG", "steps": 5}
    back = load_graph(save_graph(graph, tmp_path / "g.pt"))
    assert back.src_names == graph.src_names and back.spans == graph.spans and back.meta == graph.meta
    assert torch.equal(back.scores, graph.scores)
    with pytest.raises(ValueError, match="EAP-IG / MIB files hold language-model graphs"):
        to_eap_json(graph, tmp_path / "g.json")


def test_unknown_names_are_errors_that_suggest(tmp_path):
    graph = Graph.from_shapes(2, 2)
    with pytest.raises(KeyError, match=r"unknown source node 'a0.h7'.*did you mean"):
        graph.edge_index("a0.h7->m1")
    with pytest.raises(KeyError, match=r"unknown destination 'm7'"):
        graph.edge_index("a0.h1->m7")
    with pytest.raises(KeyError, match="is not an edge of this graph"):
        graph.edge_index("m1->m0")
    data = {"cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False}, "nodes": {},
            "edges": {"a0.h9->logits": {"score": 1.0, "in_graph": True}}}  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: unknown source node 'a0.h9'"):
        from_eap_json(tmp_path / "bad.json")


def test_edges_table_ranks_and_names_every_real_edge():
    graph = _scored(Graph.from_shapes(2, 2), seed=4)
    table = graph.edges()
    assert len(table) == graph.n_edges and table["score"].abs().is_monotonic_decreasing
    first = table.iloc[0]
    assert graph.scores[graph.edge_index(first["edge"])].item() == pytest.approx(first["score"])
    assert set(table["qkv"].dropna()) == {"q", "k", "v"}
    assert graph.edges(top=3, by="signed")["score"].is_monotonic_decreasing


# ----------------------------------------------------------------------------------- selection
def test_topn_keeps_the_best_edges_then_prunes_dangling_ones():
    graph = Graph.from_shapes(2, 1)
    graph.scores[:] = 0.0
    for name, score in {"a0.h0->logits": 5.0, "input->a0.h0<v>": -4.0, "a1.h0->m1": 3.0, "input->m0": 0.5}.items():
        graph.scores[graph.edge_index(name)] = score
    circuit = find_circuit(graph, n_edges=3)
    kept = set(circuit.edges(in_circuit=True)["edge"])
    # a1.h0->m1 is in the top 3 but m1 reaches nothing and a1.h0 reads nothing: pruned
    assert kept == {"a0.h0->logits", "input->a0.h0<v>"}
    assert set(circuit.edges(in_circuit=True, by="signed")["edge"]) == kept
    signed = find_circuit(graph, n_edges=2, by="signed")
    assert set(signed.edges(in_circuit=True)["edge"]) == set()  # a0.h0 loses its input edge (signed -4): dangling


def test_greedy_grows_from_the_logits_in_heap_order():
    graph = Graph.from_shapes(2, 1)
    graph.scores[:] = 0.0
    scores = {"m1->logits": 1.0, "a1.h0->logits": 0.9, "input->a1.h0<q>": 5.0, "a0.h0->m1": 0.8, "input->m1": 0.1}
    for name, score in scores.items():
        graph.scores[graph.edge_index(name)] = score
    circuit = find_circuit(graph, n_edges=3, method="greedy", prune=False)
    # the edge scoring 5 is not a candidate until a1.h0 is in the circuit
    assert set(circuit.edges(in_circuit=True)["edge"]) == {"m1->logits", "a1.h0->logits", "input->a1.h0<q>"}


def test_threshold_keeps_edges_at_or_above_it():
    graph = _scored(Graph.from_shapes(2, 2), seed=5)
    circuit = find_circuit(graph, method="threshold", threshold=0.5, prune=False)
    assert torch.equal(circuit.in_circuit, (graph.scores.abs() >= 0.5) & graph.real)


@pytest.mark.parametrize("method", ["topn", "greedy"])
def test_pruned_circuits_have_no_dangling_nodes_and_at_most_n_edges(method):
    graph = _scored(Graph.from_shapes(3, 3), seed=6)
    for n in (1, 5, 20, 80):
        circuit = find_circuit(graph, n_edges=n, method=method)
        assert circuit.n_edges_in_circuit <= n
        again = prune_circuit(circuit.copy())
        assert torch.equal(again.in_circuit, circuit.in_circuit) and torch.equal(again.node_in_circuit, circuit.node_in_circuit)
        edges = circuit.in_circuit & circuit.real
        nodes = circuit.node_in_circuit
        assert torch.equal(edges.any(1), nodes)  # every node has an outgoing edge, every edge a node
        has_input = (circuit.owner & edges.any(0)).any(1)
        assert (has_input | torch.tensor([name == "input" for name in circuit.src_names]))[nodes].all()


def test_circuit_sizes_are_checked():
    graph = Graph.from_shapes(1, 1)
    with pytest.raises(ValueError, match="exactly one of n_edges and fraction"):
        find_circuit(graph)
    with pytest.raises(ValueError, match=r"n_edges must be in \[0, 8\]"):
        find_circuit(graph, n_edges=9)
    with pytest.raises(ValueError, match="unknown method 'best'"):
        find_circuit(graph, n_edges=1, method="best")


def _scored(graph: Graph, seed: int) -> Graph:
    graph.scores = torch.randn(graph.scores.shape, generator=torch.Generator().manual_seed(seed))
    return graph
