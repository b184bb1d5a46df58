"""Edge attribution pinned to exact identities (reference/CIRCUITS.md §8), on tiny random models of
both families in fp64: LLaVA (MHA, CLIP with LayerNorm) and InternVL (GQA 4/2, InternViT-6B with
layer scale, RMSNorm and full-width q/k norm), over the language model and over both towers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from circuit_pairs import ANSWER, load, make_pair, painted, rel_err

from hooked_vlm.circuits import CircuitPair, Graph, edge_attribution, exact_edge_effects
from hooked_vlm.circuits.exact import edge_forward_metric
from hooked_vlm.circuits.pairs import kl_metric
from hooked_vlm.patching import answer_nll_metric, head_attribution

BOTH = ("vision", "language")


@pytest.fixture(scope="module", params=["llava_base", "internvl_6b"])
def setup(request, tiny_checkpoint, photos):
    model = load(tiny_checkpoint, request.param)
    return model, make_pair(model, photos["chelsea"])


def test_eap_is_the_directional_derivative_along_each_edge(setup):
    """s(u→v) = d/dε M(x_v + ε Δa_u) at 0: forward-mode AD through the edge-masked forward
    (1e-10) and a central finite difference (1e-6), for edges of every kind in both towers."""
    model, pair = setup
    graph = edge_attribution(model, pair, method="EAP", towers=BOTH, progress=False)
    kinds = ["input->", "<q>", "<k>", "<v>", "->m", "->logits", "->projector", "projector->", "v.input->", "v.a"]
    table = graph.edges()
    chosen = [table[table["edge"].str.contains(kind, regex=False)].iloc[0]["edge"] for kind in kinds]
    model.set_attention_implementation("eager")  # forward-mode AD has no CPU kernel for fused attention
    try:
        for name in chosen:
            index = graph.edge_index(name)
            direction = torch.zeros(graph.scores.shape, dtype=torch.float64)
            direction[index] = 1.0
            zero = torch.zeros_like(direction)
            with forward_ad.dual_level():
                value = edge_forward_metric(model, pair, graph, forward_ad.make_dual(zero, direction))
                jvp = forward_ad.unpack_dual(value).tangent.item()
            eps = 1e-5
            with torch.no_grad():
                plus, minus = (edge_forward_metric(model, pair, graph, s * eps * direction).item() for s in (1, -1))
            score = graph.scores[index].item()
            assert score == pytest.approx(jvp, rel=1e-10, abs=1e-13), name
            assert score == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-10), name
    finally:
        model.set_attention_implementation("auto")


def test_a_head_s_summed_edge_scores_are_its_attribution_patching_score(setup):
    """Σ_v s(head→v) = patching.head_attribution (node "z"): ∂M/∂a_u = Σ_v ∂M/∂x_v, result = z·W_O."""
    model, pair = setup
    graph = edge_attribution(model, pair, method="EAP", towers=BOTH, progress=False)
    reference = head_attribution(model, pair.clean, pair.corrupted, pair.metric)
    for tower in ("language", "vision"):
        # head_attribution returns fp32: compare at fp32's precision
        assert rel_err(graph.head_scores(tower), reference[tower]) < 1e-6, tower


@pytest.mark.parametrize("towers", [("language",), BOTH])
def test_fast_backend_equals_autograd_through_the_edge_masked_forward(setup, towers):
    """backend="vjp" (closed-form norm VJPs on a plain forward) = backend="mask" (∂M/∂w at w=0), every edge."""
    model, pair = setup
    fast = edge_attribution(model, pair, method="EAP", towers=towers, progress=False)
    masked = edge_attribution(model, pair, method="EAP", towers=towers, backend="mask", progress=False)
    assert rel_err(fast.scores, masked.scores) < 1e-10


def test_ig_rules_place_the_gradients_as_documented(setup):
    model, pair = setup
    run = lambda **kw: edge_attribution(model, pair, progress=False, **kw).scores  # noqa: E731
    eap = run(method="EAP")
    assert torch.equal(run(method="EAP-IG", steps=1, rule="right"), eap)  # α = 1: the clean input
    at_corrupted = run(method="EAP-IG", steps=1, rule="left")  # α = 0
    denoising = run(method="EAP", direction="denoising")  # gradient at the corrupted run, Δ reversed
    assert rel_err(at_corrupted, -denoising) < 1e-12
    midpoint = run(method="EAP-IG", steps=1, rule="midpoint")  # α = 1/2
    assert rel_err(run(method="EAP-IG", steps=2, rule="left"), (at_corrupted + midpoint) / 2) < 1e-12  # EAP-IG@7af394a: k = 0..m-1
    assert rel_err(run(method="EAP-IG", steps=2, rule="right"), (midpoint + eap) / 2) < 1e-12  # the 2024 paper: k = 1..m
    assert rel_err(run(method="clean-corrupted"), (eap + at_corrupted) / 2) < 1e-12


@pytest.mark.parametrize(("towers", "ig_input", "node"), [(("language",), "inputs_embeds", "input"), (BOTH, "vision_embed", "v.input")])
def test_ig_at_the_input_is_complete_and_converges_quadratically(setup, photos, towers, ig_input, node):
    """With midpoint IG over an input node (the language model's embeddings, or the vision tower's
    after CLIP's ln_pre), Σ_v s(input→v) → M(corrupted) − M(clean); the midpoint rule's error falls
    ~4x when the steps double."""
    model, _ = setup
    pair = make_pair(model, photos["chelsea"], strength=0.25)  # a short, smooth path
    with torch.no_grad():
        clean, corrupted = (pair.metric(model(x), 0).item() for x in (pair.clean, pair.corrupted))
    errors = {}
    for steps in (16, 32):
        graph = edge_attribution(model, pair, towers=towers, ig_input=ig_input, steps=steps, rule="midpoint", progress=False)
        errors[steps] = graph.node_scores()[node] - (corrupted - clean)
    assert abs(errors[32]) < 1e-3 * abs(corrupted - clean)
    assert 3.5 < errors[16] / errors[32] < 4.5


def test_ig_at_the_pixels_is_ig_at_the_vision_embeddings_when_they_are_linear_in_the_pixels(setup):
    """InternViT's first residual stream is an affine map of the pixels (patch convolution plus
    positions): interpolating either is the same path. CLIP's `ln_pre` is not affine: the paths differ."""
    model, pair = setup
    run = lambda where: edge_attribution(model, pair, towers=BOTH, ig_input=where, steps=3, progress=False).scores  # noqa: E731
    pixels, embeddings = run("pixels"), run("vision_embed")
    if model.cfg.vision.ln_pre:
        assert rel_err(pixels, embeddings) > 1e-3
    else:
        assert rel_err(pixels, embeddings) < 1e-9


def test_eap_is_exact_to_first_order_in_the_size_of_the_corruption(setup):
    """corrupted_t = clean + t·(corrupted − clean) in pixels: |exact_t − EAP_t| = O(t²) per edge."""
    model, pair = setup
    graph = edge_attribution(model, pair, method="EAP", towers=BOTH, progress=False)
    edges = list(graph.edges(top=12)["edge"])
    gaps = []
    for t in (0.02, 0.01):
        pixels = pair.clean.pixel_values + t * (pair.corrupted.pixel_values - pair.clean.pixel_values)
        near = CircuitPair(pair.clean, replace(pair.corrupted, pixel_values=pixels), pair.metric)
        eap = edge_attribution(model, near, method="EAP", towers=BOTH, progress=False)
        exact = exact_edge_effects(model, near, edges, towers=BOTH, progress=False)
        index = [eap.edge_index(name) for name in edges]
        gaps.append(torch.stack([(exact.scores[i] - eap.scores[i]).abs() for i in index]))
    ratio = gaps[0] / gaps[1]
    assert ratio.median() == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize(("towers", "edges"), [(("language",), ["input->a0.h1<k>"]), (BOTH, ["v.input->v.a1.h1<q>"])])
def test_per_edge_ig_converges_to_the_exact_edge_effect(setup, towers, edges):
    """∫₀¹ ∂M/∂w_e dw_e (64 midpoint steps, run as 64 copies) = M(edge corrupted) − M(clean)."""
    model, pair = setup
    graph = Graph.from_model(model, towers=towers)
    exact = exact_edge_effects(model, pair, edges, towers=towers, progress=False)
    steps = 64
    for name in edges:
        index = graph.edge_index(name)
        weights = torch.zeros((steps,) + tuple(graph.scores.shape), dtype=torch.float64)
        weights[(slice(None),) + index] = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        weights.requires_grad_(True)
        (grad,) = torch.autograd.grad(edge_forward_metric(model, pair, graph, weights), [weights])
        expected = exact.scores[exact.edge_index(name)].item()
        assert grad[(slice(None),) + index].mean().item() == pytest.approx(expected, rel=1e-4, abs=1e-12), name


def test_grouped_key_value_scores_are_the_ungrouped_ones_summed_over_a_group(tiny_checkpoint, photos):
    model = load(tiny_checkpoint, "internvl_6b")  # 4 query heads share 2 key/value heads
    pair = make_pair(model, photos["chelsea"])
    ungrouped = edge_attribution(model, pair, method="EAP", kv="ungrouped", progress=False)
    grouped = edge_attribution(model, pair, method="EAP", kv="grouped", progress=False)
    for layer in range(model.cfg.n_layers):
        for kind in "kv":
            for group in range(2):
                summed = sum(ungrouped.scores[:, ungrouped.dst_index(f"a{layer}.h{h}<{kind}>")] for h in (2 * group, 2 * group + 1))
                assert rel_err(grouped.scores[:, grouped.dst_index(f"a{layer}.kv{group}<{kind}>")], summed) < 1e-10
        query = f"a{layer}.h1<q>"
        assert rel_err(grouped.scores[:, grouped.dst_index(query)], ungrouped.scores[:, ungrouped.dst_index(query)]) < 1e-12


def test_the_reference_runs_keep_no_residual_streams(setup):
    """Only a plain edge_forward reads `Sources.streams`: EAP-IG's two reference runs, alive for
    every step of a pair after their outputs are freed, keep none."""
    from hooked_vlm.circuits.attribute import _reference_runs

    model, pair = setup
    graph = Graph.from_model(model, towers=BOTH)
    clean, corrupted, _ = _reference_runs(model, graph.structure, pair.clean, pair.corrupted, "vision_embed", ())
    assert len(clean) == len(corrupted) == len(graph.structure.sources)
    assert not clean.streams and not corrupted.streams


def test_pairs_one_at_a_time_average_to_a_left_padded_batch(setup, photos):
    model, _ = setup
    images, prompts = [photos["chelsea"], photos["coffee"].resize(photos["chelsea"].size)], ["Where is the cat?", "Where is it, please?"]
    clean = model.prepare(images, prompts, answers=[ANSWER, ANSWER])
    corrupted = model.prepare([painted(i) for i in images], prompts, answers=[ANSWER, ANSWER])
    assert not clean.attention_mask.all()  # the shorter prompt is left-padded
    batched = edge_attribution(model, CircuitPair(clean, corrupted, answer_nll_metric(clean)), steps=3, progress=False)
    single = [edge_attribution(model, make_pair(model, image, prompt), steps=3, progress=False) for image, prompt in zip(images, prompts)]
    assert rel_err(batched.scores, (single[0].scores + single[1].scores) / 2) < 1e-9
    again = edge_attribution(model, CircuitPair(clean, corrupted, answer_nll_metric(clean)), steps=3, progress=False)
    assert torch.equal(again.scores, batched.scores)  # deterministic


def test_mean_abs_aggregation_averages_each_pair_s_absolute_scores(setup, photos):
    model, pair = setup
    other = make_pair(model, photos["coffee"].resize(photos["chelsea"].size))
    single = [edge_attribution(model, p, method="EAP", progress=False).scores for p in (pair, other)]
    both = edge_attribution(model, [pair, other], method="EAP", aggregation="mean_abs", progress=False)
    assert rel_err(both.scores, (single[0].abs() + single[1].abs()) / 2) < 1e-12


def test_scores_are_fp32_whatever_the_model_dtype(tiny_checkpoint, photos):
    model = load(tiny_checkpoint, "llava_base", dtype=torch.bfloat16)
    graph = edge_attribution(model, make_pair(model, photos["chelsea"]), steps=2, progress=False)
    assert graph.scores.dtype == torch.float32 and graph.scores.abs().sum() > 0


# ---------------------------------------------------------------------------------- bad input
def test_a_pair_with_two_layouts_is_an_error(setup, photos):
    model, pair = setup
    other = model.prepare(photos["grace_hopper_tall"], "Where is the cat in this photo?", answers=ANSWER)
    with pytest.raises(ValueError, match="must share one token layout"):
        CircuitPair(pair.clean, other, pair.metric)


def test_a_divergence_metric_with_eap_is_an_error(setup):
    model, pair = setup
    with torch.no_grad():
        logits = model(pair.clean)
    kl = CircuitPair(pair.clean, pair.corrupted, kl_metric(logits, pair.clean.answer_mask.roll(-1, dims=1)))
    with pytest.raises(ValueError, match="divergence from the clean run.*use method='EAP-IG'"):
        edge_attribution(model, kl, method="EAP", progress=False)
    assert edge_attribution(model, kl, steps=2, progress=False).scores.abs().sum() > 0  # EAP-IG scores it


def test_a_metric_with_no_gradient_at_the_clean_run_is_an_error(setup):
    model, pair = setup
    flat = CircuitPair(pair.clean, pair.corrupted, lambda logits, offset: logits.sum((1, 2)) * 0.0)
    with pytest.raises(ValueError, match="gradient is zero at the clean input"):
        edge_attribution(model, flat, method="EAP", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="EAP", steps=5), "no steps or rule"),
        (dict(method="clean-corrupted", rule="left"), "no steps or rule"),
        (dict(method="EAP-IG", rule="trapezoid"), "unknown rule 'trapezoid'"),
        (dict(method="EAP-IG", steps=0), "steps must be a positive integer"),
        (dict(method="ACDC"), "unknown method 'ACDC'"),
        (dict(towers=BOTH, ig_input="inputs_embeds"), "interpolate upstream of it"),
        (dict(method="EAP-IG", backend="mask"), "method='EAP' only"),
    ],
)
def test_inconsistent_options_are_errors(setup, kwargs, message):
    model, pair = setup
    with pytest.raises(ValueError, match=message):
        edge_attribution(model, pair, progress=False, **kwargs)


def test_a_metric_returning_nan_is_an_error(setup):
    model, pair = setup
    bad = CircuitPair(pair.clean, pair.corrupted, lambda logits, offset: logits[:, 0, 0] * float("nan"))
    with pytest.raises(ValueError, match="the metric returned NaN"):
        edge_attribution(model, bad, progress=False)


def test_inputs_without_an_answer_cannot_make_the_nll_metric(setup):
    model, pair = setup
    with pytest.raises(ValueError, match="carry no answer"):
        answer_nll_metric(replace(pair.clean, answer_mask=None))
