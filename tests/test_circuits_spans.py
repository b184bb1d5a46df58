"""Position spans: built from the image-token map, a partition of the positions, and edges
scored and evaluated per span (reference/CIRCUITS.md §5.2, T15 for non-crossing edges)."""

from __future__ import annotations

import pytest
import torch
from circuit_pairs import box_pixels, load, make_pair, rel_err

from hooked_vlm.circuits import VLM_SPANS, CircuitPair, Graph, Spans, edge_attribution, evaluate_circuit, source_outputs
from hooked_vlm.circuits.exact import edge_forward_metric

BOTH = ("vision", "language")


@pytest.fixture(scope="module", params=["llava_base", "internvl_6b"])
def setup(request, tiny_checkpoint, photos):
    model = load(tiny_checkpoint, request.param)
    plain = make_pair(model, photos["chelsea"])
    spans = Spans.from_layout(model, plain.clean, box=box_pixels(photos["chelsea"]))
    return model, plain, CircuitPair(plain.clean, plain.corrupted, plain.metric, spans)


def test_vlm_spans_partition_the_positions_as_the_layout_says(setup, photos):
    model, plain, pair = setup
    spans = pair.spans
    assert spans.names == VLM_SPANS
    index = spans.language[0]
    layout = plain.clean.layout
    object_positions = layout.box_to_positions(box_pixels(photos["chelsea"]))
    assert len(object_positions) > 0
    assert (index[object_positions] == VLM_SPANS.index("object")).all()
    others = torch.tensor([p for p in layout.position.tolist() if p not in object_positions.tolist()], dtype=torch.long)
    assert (index[others] == VLM_SPANS.index("image")).all()
    answer = plain.clean.answer_mask[0].nonzero().flatten()
    assert (index[answer] == VLM_SPANS.index("answer")).all()
    assert (index[: int(layout.position.min())] == VLM_SPANS.index("prefix")).all()
    # the vision tower: the object's patches are "object", CLS and the rest "image"
    assert (spans.vision[:, 0] == VLM_SPANS.index("image")).all() and (spans.vision == VLM_SPANS.index("object")).any()


@pytest.mark.parametrize("towers", [("language",), BOTH])
def test_span_scores_add_up_to_the_position_summed_scores(setup, towers):
    model, plain, pair = setup
    summed = edge_attribution(model, plain, towers=towers, steps=2, progress=False)
    by_span = edge_attribution(model, pair, towers=towers, steps=2, progress=False)
    assert by_span.scores.shape == summed.scores.shape + (len(VLM_SPANS),)
    assert rel_err(by_span.scores.sum(-1), summed.scores) < 1e-12
    assert by_span.edges(top=1)["edge"].iloc[0].count("@") == 1


def test_span_evaluation_with_every_span_is_unmasked_evaluation(setup):
    model, plain, pair = setup
    graph = Graph.from_model(model, towers=BOTH, spans=VLM_SPANS)
    full = evaluate_circuit(model, graph, pair).table.iloc[0]
    assert full["m_circuit"] == pytest.approx(full["m_clean"], rel=1e-12)
    graph.in_circuit[:] = False
    assert evaluate_circuit(model, graph, pair).table.iloc[0]["m_circuit"] == pytest.approx(full["m_corrupted"], rel=1e-12)


def test_removing_an_edge_in_one_span_patches_only_its_positions(setup):
    model, _, pair = setup
    graph = Graph.from_model(model, spans=VLM_SPANS)
    with torch.no_grad():
        _, clean = source_outputs(model, pair.clean, graph.structure)
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure)
    delta = (corrupted[0] - clean[0])[:, :, 0]  # the input node
    at = pair.spans.language == VLM_SPANS.index("object")
    weights = torch.zeros(graph.scores.shape, dtype=torch.float64)
    weights[graph.edge_index("input->m0@object")] = 1.0
    with torch.no_grad():
        patched = edge_forward_metric(model, pair, graph, weights).item()
        by_hand = pair.metric(model.run_with_hooks(pair.clean, fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: x + delta * at[..., None])]), 0).item()
        plain = pair.metric(model(pair.clean), 0).item()
    assert patched == pytest.approx(by_hand, rel=1e-12) and abs(patched - plain) > 1e-8


def test_spans_that_do_not_partition_the_positions_are_an_error(setup):
    model, plain, pair = setup
    n = plain.clean.input_ids.shape[1]
    first = torch.zeros(1, n, dtype=torch.bool)
    first[0, : n // 2] = True
    with pytest.raises(ValueError, match=r"do not partition the positions: \(row, position\) \[\[0, \d+\]"):
        Spans.from_masks({"first": first, "gap": torch.zeros_like(first)}, plain.clean)
    with pytest.raises(ValueError, match=r"position 0 of row 0 is in \['first', 'all'\]"):
        Spans.from_masks({"first": first, "all": torch.ones_like(first)}, plain.clean)
    spans = Spans.from_masks({"first": first, "rest": ~first}, plain.clean)
    with pytest.raises(ValueError, match="needs spans of its positions too"):
        edge_attribution(model, CircuitPair(plain.clean, plain.corrupted, plain.metric, spans), towers=BOTH, progress=False)
    spans.language[0, 3] = 7
    with pytest.raises(ValueError, match="some real position is in no span"):
        CircuitPair(plain.clean, plain.corrupted, plain.metric, spans)
    vision = pair.spans.vision
    for wrong, match in ((vision[:1].repeat(len(vision) + 1, 1), "one row per view"), (vision.flatten(), "one row per view"),
                         (torch.full_like(vision, -1), "some position is in no span")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CircuitPair(plain.clean, plain.corrupted, plain.metric, Spans(pair.spans.names, pair.spans.language, wrong))
    short = CircuitPair(plain.clean, plain.corrupted, plain.metric, Spans(pair.spans.names, pair.spans.language, vision[:, :-1]))
    graph = Graph.from_model(model, towers=BOTH, spans=VLM_SPANS)
    for run in (lambda: edge_attribution(model, short, towers=BOTH, progress=False), lambda: evaluate_circuit(model, graph, short)):
        with pytest.raises(ValueError, match=rf"vision spans cover {vision.shape[1] - 1} positions per view; .* has {vision.shape[1]}"):
            run()
