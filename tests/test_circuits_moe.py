"""Circuits of an InternVL whose language model has mixture-of-experts MLPs: the MLP node is the
whole MoE MLP (router and experts together: its input is `hook_mlp_in`, its output
`hook_mlp_out`), so the graph, the edge-masked forward and the attributions are the dense ones."""

from __future__ import annotations

import pytest
import torch

import torch.autograd.forward_ad as forward_ad
from circuit_pairs import load, make_pair, rel_err

from hooked_vlm.circuits import Graph, edge_attribution, evaluate_circuit
from hooked_vlm.circuits.exact import edge_forward_metric


@pytest.fixture(scope="module", params=["internvl_moe", "internvl_moe_top1"])
def setup(request, tiny_checkpoint, photos):
    model = load(tiny_checkpoint, request.param)
    assert any(model.cfg.text.is_moe_layer(layer) for layer in range(model.cfg.text.n_layers))
    return model, make_pair(model, photos["chelsea"])


def test_an_moe_mlp_is_one_node_and_the_full_and_empty_circuits_are_the_clean_and_corrupted_runs(setup):
    model, pair = setup
    graph = Graph.from_model(model)
    assert [name for name in graph.src_names if name.startswith("m")] == [f"m{l}" for l in range(model.cfg.text.n_layers)]
    row = evaluate_circuit(model, graph, pair).table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_clean"], rel=1e-12)
    empty = graph.copy()
    empty.in_circuit[:] = False
    row = evaluate_circuit(model, empty, pair).table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_corrupted"], rel=1e-12) and abs(row["m_clean"] - row["m_corrupted"]) > 1e-6


def test_eap_is_the_directional_derivative_along_the_edges_into_and_out_of_moe_mlps(setup):
    """s(u→v) = d/dε M(x_v + ε Δa_u) at 0 (forward-mode AD through the edge-masked forward, and a
    central finite difference): the router's choice is locally constant, its weights differentiated.
    The router's softmax is fp32 in an fp64 model (as Hugging Face's), hence fp32's tolerances
    (and a wider finite-difference step: fp32 rounding over 1e-5 would be 1% noise)."""
    model, pair = setup
    graph = edge_attribution(model, pair, method="EAP", progress=False)
    masked = edge_attribution(model, pair, method="EAP", backend="mask", progress=False)
    assert rel_err(graph.scores, masked.scores) < 1e-10
    table = graph.edges()
    chosen = [table[table["edge"].str.contains(kind, regex=False)].iloc[0]["edge"] for kind in ("->m", "m0->", "m1->logits")]
    model.set_attention_implementation("eager")  # forward-mode AD has no CPU kernel for fused attention
    try:
        for name in chosen:
            direction = torch.zeros(graph.scores.shape, dtype=torch.float64)
            direction[graph.edge_index(name)] = 1.0
            with forward_ad.dual_level():
                value = edge_forward_metric(model, pair, graph, forward_ad.make_dual(torch.zeros_like(direction), direction))
                jvp = forward_ad.unpack_dual(value).tangent.item()
            with torch.no_grad():
                plus, minus = (edge_forward_metric(model, pair, graph, s * 1e-3 * direction).item() for s in (1, -1))
            score = graph.scores[graph.edge_index(name)].item()
            assert score == pytest.approx(jvp, rel=1e-6, abs=1e-10), name
            assert score == pytest.approx((plus - minus) / 2e-3, rel=1e-3, abs=1e-8), name
    finally:
        model.set_attention_implementation("auto")
