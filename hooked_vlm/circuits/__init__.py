"""Edge-level circuit discovery across both towers: EAP, EAP-IG, circuits and their faithfulness.

    from hooked_vlm.circuits import CircuitPair, edge_attribution, find_circuit, evaluate_circuit
    pair = CircuitPair(clean, corrupted, patching.answer_nll_metric(clean))   # same token layout
    graph = edge_attribution(model, [pair], method="EAP-IG", steps=5)        # every edge scored
    circuit = find_circuit(graph, fraction=0.05)                              # top 5% of edges, pruned
    evaluate_circuit(model, circuit, [pair]).faithfulness                     # MIB's normalised f

The graph (`Graph`) is EAP-IG's / MIB's for the language model — the same node and edge names,
score matrix, top-n / greedy selection and files (`to_eap_json`, `from_eap_json`, `.pt`) — and
extends over the vision tower, joined to the language model through a projector node
(`towers=("vision", "language")`). Grouped-query attention is ungrouped by default (MIB's
convention) without changing the model's outputs; `kv="grouped"` keeps key/value destinations per
key/value head. Pairs may carry position spans (`Spans.from_layout`: the object's image tokens,
the rest of the image, the question, the answer); every edge then has one score per span.

Rooms: `structure` (names and indices), `graph`, `selection` (find_circuit, prune), `io` (files),
`sources` (what a run gives the edge-masked forward), `forward` (the edge-masked forward), `plain`
(its plain evaluation: only what a circuit changes), `attribute` (EAP, EAP-IG), `exact` (exact
edge effects), `evaluate` (faithfulness, curves, CPR/CMD), `spans`, `pairs` (CircuitPair,
object-removed pairs).
See reference/CIRCUITS.md for the method and its pitfalls.
"""

from hooked_vlm.circuits.attribute import edge_attribution, ungrouped_kv
from hooked_vlm.circuits.evaluate import (
    MIB_FRACTIONS,
    CircuitEvaluation,
    FaithfulnessCurve,
    area_from_one,
    area_under,
    evaluate_circuit,
    faithfulness_curve,
    mib_scores,
)
from hooked_vlm.circuits.exact import exact_edge_effects
from hooked_vlm.circuits.forward import edge_forward
from hooked_vlm.circuits.sources import source_outputs
from hooked_vlm.circuits.graph import Graph
from hooked_vlm.circuits.io import from_eap_json, from_eap_pt, load_graph, save_graph, to_eap_json, to_eap_pt
from hooked_vlm.circuits.pairs import CircuitPair
from hooked_vlm.circuits.selection import find_circuit, prune_circuit
from hooked_vlm.circuits.spans import VLM_SPANS, Spans

__all__ = [
    "CircuitPair", "Spans", "VLM_SPANS", "Graph", "edge_attribution", "exact_edge_effects", "find_circuit",
    "prune_circuit", "evaluate_circuit", "faithfulness_curve", "mib_scores", "CircuitEvaluation", "FaithfulnessCurve",
    "MIB_FRACTIONS", "area_under", "area_from_one", "edge_forward", "source_outputs", "ungrouped_kv",
    "to_eap_json", "from_eap_json", "to_eap_pt", "from_eap_pt", "save_graph", "load_graph",
]  # fmt: skip
