"""Evaluating circuits: the edge-masked forward against patching written by hand, and MIB's
faithfulness, CPR and CMD (reference/CIRCUITS.md §8: T7, T8, T9, T13)."""

from __future__ import annotations

import pytest
import torch
from circuit_pairs import ANSWER, load, make_pair, painted, rel_err

from hooked_vlm.circuits import (
    MIB_FRACTIONS,
    Graph,
    area_from_one,
    area_under,
    edge_attribution,
    evaluate_circuit,
    faithfulness_curve,
    find_circuit,
    mib_scores,
    edge_forward,
    source_outputs,
    ungrouped_kv,
)
from hooked_vlm.circuits.exact import edge_forward_metric
from hooked_vlm.circuits.plain import PlainPatcher
from hooked_vlm.patching import naive_head_patching

BOTH = ("vision", "language")


@pytest.fixture(scope="module", params=["llava_base", "internvl_6b"])
def setup(request, tiny_checkpoint, photos):
    model = load(tiny_checkpoint, request.param)
    return model, make_pair(model, photos["chelsea"])


def _metric(model, pair, fwd_hooks=()) -> float:
    with torch.no_grad():
        return pair.metric(model.run_with_hooks(pair.clean, fwd_hooks=list(fwd_hooks)), 0).item()


@pytest.mark.parametrize("towers", [("language",), BOTH])
def test_the_full_circuit_is_the_clean_run_and_the_empty_one_the_corrupted_run(setup, towers):
    model, pair = setup
    graph = Graph.from_model(model, towers=towers)
    full = evaluate_circuit(model, graph, pair)
    row = full.table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_clean"], rel=1e-12) and full.faithfulness == pytest.approx(1.0, abs=1e-9)
    empty = graph.copy()
    empty.in_circuit[:] = False
    row = evaluate_circuit(model, empty, pair).table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_corrupted"], rel=1e-12)
    assert abs(row["m_clean"] - row["m_corrupted"]) > 1e-3  # the pair does differ


def test_the_full_circuit_is_the_clean_run_in_fp32_too(tiny_checkpoint, photos):
    model = load(tiny_checkpoint, "internvl_6b", dtype=torch.float32)
    pair = make_pair(model, photos["chelsea"])
    row = evaluate_circuit(model, Graph.from_model(model, towers=BOTH), pair).table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_clean"], rel=1e-5)


# ------------------------------------------------------------------- one edge = path patching
def _corrupted_sources(model, pair, graph):
    with torch.no_grad():
        _, clean = source_outputs(model, pair.clean, graph.structure)
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure)
    return clean, corrupted


def _delta(graph, clean, corrupted, source: str) -> torch.Tensor:
    """ã_u − a_u of one source node, `[rows, pos, d_model]`."""
    index = graph.src_index(source)
    for group, span in enumerate(graph.structure.sources):
        if span.start <= index < span.stop:
            return (corrupted[group] - clean[group])[:, :, index - span.start]
    raise KeyError(source)


def _edge_effect(model, pair, graph, name: str) -> float:
    weights = torch.zeros(graph.scores.shape, dtype=torch.float64)
    weights[graph.edge_index(name)] = 1.0
    with torch.no_grad():
        return edge_forward_metric(model, pair, graph, weights).item()


def _head_input_hooks(model, layer: int, which: str, index: int, delta: torch.Tensor, prefix: str = ""):
    """Replace head `index`'s q/k/v slice by the projection of ln1(x + Δ): the only change."""
    block = (model.vision.blocks if prefix else model.blocks)[layer]
    seen = {}

    def keep(x, hook):
        seen["x"] = x

    def patch(t, hook):
        projected = getattr(block.attn, f"{which}_proj")(block.ln1(seen["x"] + delta))  # the plain fused projection
        projected = projected.view(*t.shape[:2], -1, t.shape[-1])
        t = t.clone()
        t[:, :, index] = projected[:, :, index // (t.shape[2] // projected.shape[2])]  # ungrouped: the head's group
        return t

    return [(f"{prefix}blocks.{layer}.hook_attn_in", keep), (f"{prefix}blocks.{layer}.attn.hook_{which}", patch)]


@pytest.mark.parametrize("kv", ["ungrouped", "grouped"])
def test_removing_one_edge_is_path_patching_by_hand(setup, kv):
    model, pair = setup
    graph = Graph.from_model(model, towers=BOTH, kv=kv)
    clean, corrupted = _corrupted_sources(model, pair, graph)
    d = lambda source: _delta(graph, clean, corrupted, source)  # noqa: E731
    n_v = len(model.vision.blocks)
    group = "kv1" if kv == "grouped" and model.cfg.n_key_value_heads != model.cfg.n_heads else "h1"
    cases = {
        "a0.h0->a1.h1<q>": _head_input_hooks(model, 1, "q", 1, d("a0.h0")),
        f"a0.h2->a1.{group}<k>": _head_input_hooks(model, 1, "k", 1, d("a0.h2")),
        f"a0.h0->a1.{group}<v>": _head_input_hooks(model, 1, "v", 1, d("a0.h0")),
        "a0.h3->m0": [("blocks.0.hook_mlp_in", lambda x, hook: x + d("a0.h3"))],
        "m1->logits": [(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", lambda x, hook: x + d("m1"))],
        f"v.a{n_v - 1}.h0->projector": [(f"vision.blocks.{n_v - 1}.hook_resid_post", lambda x, hook: x + d(f"v.a{n_v - 1}.h0"))],
        "projector->a0.h0<q>": _head_input_hooks(model, 0, "q", 0, d("projector")),
        "v.input->v.a1.h0<v>": _head_input_hooks(model, 1, "v", 0, d("v.input"), prefix="vision."),
    }
    clean_metric = _metric(model, pair)
    for name, hooks in cases.items():
        with ungrouped_kv(model, kv == "ungrouped"):
            by_hand = _metric(model, pair, hooks)
        assert abs(by_hand - clean_metric) > 1e-8, name  # the edge carries something
        assert _edge_effect(model, pair, graph, name) == pytest.approx(by_hand, rel=1e-10), name


def test_removing_every_outgoing_edge_of_a_head_is_patching_the_head(setup):
    model, pair = setup
    graph = Graph.from_model(model, towers=BOTH)
    positions = torch.arange(pair.clean.input_ids.shape[1])
    for layer, head in [(0, 1), (model.cfg.n_layers - 1, 2)]:
        weights = torch.zeros(graph.scores.shape, dtype=torch.float64)
        weights[graph.src_index(f"a{layer}.h{head}")] = graph.real[graph.src_index(f"a{layer}.h{head}")].double()
        with torch.no_grad():
            removed = edge_forward_metric(model, pair, graph, weights).item()
        naive = naive_head_patching(model, pair.clean, pair.corrupted, pair.metric, positions, heads=[(layer, head)])
        assert removed == pytest.approx(naive[layer, head].item(), rel=1e-10)
    # a vision head: its hook_z replaced by the corrupted run's
    name = "vision.blocks.1.attn.hook_z"
    _, cache = model.run_with_cache(pair.corrupted, names_filter=name)
    weights = torch.zeros(graph.scores.shape, dtype=torch.float64)
    weights[graph.src_index("v.a1.h1")] = graph.real[graph.src_index("v.a1.h1")].double()

    def patch(z, hook):
        z = z.clone()
        z[:, :, 1] = cache[name][:, :, 1]
        return z

    with torch.no_grad():
        assert edge_forward_metric(model, pair, graph, weights).item() == pytest.approx(_metric(model, pair, [(name, patch)]), rel=1e-10)


# ------------------------------------------------- a plain evaluation patches only what differs
def _weights(graph, density, generator) -> torch.Tensor:
    """Real edges patched with probability `density` (0/1), or fractional weights ("mixed")."""
    shape = graph.scores.shape
    if density == "mixed":
        weights = torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        weights = (torch.rand(shape, generator=generator, dtype=torch.float64) < density).double()
    return weights * graph.real


@pytest.mark.parametrize("towers, kv", [(("language",), "ungrouped"), (BOTH, "grouped"), (BOTH, "ungrouped")])
def test_a_plain_evaluation_equals_the_general_edge_forward(setup, towers, kv):
    """Without gradients, copies or spans, each destination reads this run's stream or the
    corrupted run's (x + Σ_u Δ_u over every parent is the corrupted stream) plus only the
    differences it needs; with gradients enabled every difference is weighted. Both agree for
    weights mostly kept, mostly patched, half and half and fractional; the few-kept-edges case
    (a small circuit, noising) reads the corrupted streams and needs few sources."""
    model, pair = setup
    graph = Graph.from_model(model, towers=towers, kv=kv)
    with torch.no_grad():
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure)
    generator = torch.Generator().manual_seed(0)
    for density in (0.02, 0.5, 0.98, 1.0, "mixed"):
        weights = _weights(graph, density, generator)
        plain, general = _plain_and_general(model, pair.clean, graph.structure, weights, corrupted)
        assert rel_err(plain, general) < 1e-10, density
        if density in (0.98, 1.0):
            patcher = PlainPatcher(graph.structure, weights, corrupted, use_streams=True)
            bases = [base for plan in patcher.plans.values() for base in plan.bases]
            from_corrupted = sum(len(plan.unpatched.get(1, ())) for plan in patcher.plans.values()) + sum(bases)
            assert from_corrupted > 0.9 * graph.n_dst  # nearly every destination starts from the corrupted stream
            if density == 1.0:  # the empty circuit: nothing to patch, no difference computed
                assert not bases and not patcher.needed.any()


def _plain_and_general(model, inputs, structure, weights, other, **kwargs):
    """The edge forward's plain path (no gradients) and its general one (gradients enabled:
    every difference weighted, every destination normalised and projected per head)."""
    with torch.no_grad():
        plain = edge_forward(model, inputs, structure, weights, other, **kwargs)
    with torch.enable_grad():
        general = edge_forward(model, inputs, structure, weights, other, **kwargs)
    return plain, general


def test_a_plain_evaluation_of_a_padded_batch_both_ways_resumed_or_from_embeddings_is_the_general_one(setup, photos):
    model, _ = setup
    images = [photos["chelsea"], photos["coffee"].resize(photos["chelsea"].size)]
    prompts = ["Where is the cat?", "Where is it, please?"]
    clean = model.prepare(images, prompts, answers=[ANSWER, ANSWER])
    corrupted = model.prepare([painted(image) for image in images], prompts, answers=[ANSWER, ANSWER])
    assert not clean.attention_mask.all()  # left-padded
    generator = torch.Generator().manual_seed(3)
    for towers in (("language",), BOTH):
        graph = Graph.from_model(model, towers=towers, kv="grouped")
        for base, other in ((clean, corrupted), (corrupted, clean)):  # noising, denoising
            with torch.no_grad():
                _, sources = source_outputs(model, other, graph.structure)
            for density in (0.05, 0.95):
                plain, general = _plain_and_general(model, base, graph.structure, _weights(graph, density, generator), sources)
                assert rel_err(plain, general) < 1e-10, (towers, density)
    graph = Graph.from_model(model)
    resid, embeds = {}, []
    keep = [(f"blocks.{l}.hook_resid_pre", lambda x, hook: resid.__setitem__(hook.layer(), x)) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean_sources = source_outputs(model, clean, graph.structure, keep + [("hook_inputs_embeds", lambda x, hook: embeds.append(x))])
        _, sources = source_outputs(model, corrupted, graph.structure)
    weights = _weights(graph, 0.9, generator)
    plain, general = _plain_and_general(model, clean, graph.structure, weights, sources, embeds=embeds[0])
    assert rel_err(plain, general) < 1e-10
    layer = model.cfg.n_layers // 2
    for dst in graph.structure.destinations:
        if dst.layer < layer:
            weights[:, dst.slice] = 0  # nothing patched before the resumed layer
    plain, general = _plain_and_general(model, clean, graph.structure, weights, sources, resume=(layer, resid[layer], clean_sources))
    assert rel_err(plain, general) < 1e-10


@pytest.mark.parametrize("name", ["internvl_moe", "internvl_moe_top1"])
def test_a_plain_evaluation_of_an_moe_model_is_the_general_one(tiny_checkpoint, photos, name):
    model = load(tiny_checkpoint, name)
    pair = make_pair(model, photos["chelsea"])
    graph = Graph.from_model(model)
    with torch.no_grad():
        _, sources = source_outputs(model, pair.corrupted, graph.structure)
    generator = torch.Generator().manual_seed(4)
    for density in (0.05, 0.95):
        plain, general = _plain_and_general(model, pair.clean, graph.structure, _weights(graph, density, generator), sources)
        assert rel_err(plain, general) < 1e-10, density


def test_a_plain_evaluation_with_hooks_that_edit_the_stream_patches_this_run_s_stream(setup):
    """A hook editing a residual stream breaks "x + Σ Δ = the corrupted stream": with hooks
    attached (passed or already on the model) the plain path starts from this run's stream."""
    model, pair = setup
    graph = Graph.from_model(model)
    hooks = [("blocks.1.hook_resid_pre", lambda x, hook: x * 1.5)]
    with torch.no_grad():
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure, hooks)
    weights = _weights(graph, 0.9, torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = edge_forward(model, pair.clean, graph.structure, weights, corrupted, fwd_hooks=hooks)
        with model.hooks(fwd_hooks=hooks):
            attached = edge_forward(model, pair.clean, graph.structure, weights, corrupted)
    with torch.enable_grad():
        general = edge_forward(model, pair.clean, graph.structure, weights, corrupted, fwd_hooks=hooks)
    assert rel_err(plain, general) < 1e-10 and rel_err(attached, general) < 1e-10


def test_a_plain_evaluation_of_sources_recorded_under_a_hook_is_the_general_one(setup):
    """A corrupted run made by a hook that edits a residual stream (and no hook on this run):
    its streams are not x + Σ Δ, so they must not stand for it; grad mode changes nothing."""
    model, pair = setup
    graph = Graph.from_model(model)
    edit = [("blocks.1.hook_resid_pre", lambda x, hook: x * 1.5)]
    with torch.no_grad():
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure, edit)
    weights = _weights(graph, 0.9, torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = edge_forward(model, pair.clean, graph.structure, weights, corrupted)
    with torch.enable_grad():
        general = edge_forward(model, pair.clean, graph.structure, weights, corrupted)
    assert rel_err(plain, general) < 1e-10


def test_source_outputs_keeps_the_streams_unhooked_and_when_asked(setup):
    model, pair = setup
    graph = Graph.from_model(model, towers=BOTH)
    with torch.no_grad():
        _, kept = source_outputs(model, pair.corrupted, graph.structure)
        _, unasked = source_outputs(model, pair.corrupted, graph.structure, streams=False)
        _, passed = source_outputs(model, pair.corrupted, graph.structure, [("hook_embed", lambda x, hook: None)])
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)]):
            _, attached = source_outputs(model, pair.corrupted, graph.structure)
    assert {(d.tower, d.key, d.layer) for d in graph.structure.destinations} == set(kept.streams)
    assert not unasked.streams and not passed.streams and not attached.streams


def test_a_plain_evaluation_takes_sources_of_another_dtype_as_the_general_one(tiny_checkpoint, photos):
    """Source outputs and streams recorded at fp64 serve an fp32 model: cast as the differences are."""
    model, reference = load(tiny_checkpoint, "internvl_6b", dtype=torch.float32), load(tiny_checkpoint, "internvl_6b")
    pair = make_pair(model, photos["chelsea"])
    graph = Graph.from_model(model, towers=BOTH)
    with torch.no_grad():
        _, corrupted = source_outputs(reference, pair.corrupted, graph.structure)
    weights = _weights(graph, 0.95, torch.Generator().manual_seed(2)).float()
    plain, general = _plain_and_general(model, pair.clean, graph.structure, weights, corrupted)
    assert plain.dtype == torch.float32 and rel_err(plain, general) < 1e-5


def test_a_plain_evaluation_in_bf16_is_the_general_one(tiny_checkpoint, photos):
    model = load(tiny_checkpoint, "internvl_6b", dtype=torch.bfloat16)
    pair = make_pair(model, photos["chelsea"])
    graph = Graph.from_model(model, towers=BOTH)
    with torch.no_grad():
        _, corrupted = source_outputs(model, pair.corrupted, graph.structure)
    weights = _weights(graph, 0.95, torch.Generator().manual_seed(2)).float()
    plain, general = _plain_and_general(model, pair.clean, graph.structure, weights, corrupted)
    assert plain.dtype == torch.bfloat16 and rel_err(plain, general) < 0.05


# ------------------------------------------------------------------------- curves, CPR, CMD
def test_mib_areas_of_constant_and_hand_made_curves():
    x = MIB_FRACTIONS
    assert area_under(x, [1.0] * 10) == pytest.approx(0.999) and area_from_one(x, [1.0] * 10) == 0.0
    assert area_under(x, [0.0] * 10) == 0.0 and area_from_one(x, [0.0] * 10) == pytest.approx(0.999)
    f = [0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 1.0, 0.9, 1.0]
    by_hand = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    assert area_under(x, f) == pytest.approx(by_hand)
    assert area_from_one(x, f) == pytest.approx(sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(9)))


def test_faithfulness_curve_evaluates_mib_s_top_circuits(setup):
    model, pair = setup
    graph = edge_attribution(model, pair, steps=2, progress=False)
    curve = faithfulness_curve(model, graph, pair)
    table = curve.table
    assert list(table["fraction"]) == list(MIB_FRACTIONS) and table["faithfulness"].iloc[-1] == pytest.approx(1.0)
    assert (table["n_edges_kept"] <= table["n_edges"]).all()
    for fraction in (0.1, 0.5):  # each point is evaluate_circuit of the top-n circuit ranked by signed score
        row = table[table["fraction"] == fraction].iloc[0]
        alone = evaluate_circuit(model, find_circuit(graph, fraction=fraction, by="signed"), pair)
        assert row["faithfulness"] == pytest.approx(alone.faithfulness, rel=1e-12)
    assert curve.cpr == pytest.approx(area_under(table["fraction"], table["faithfulness"]))
    scores = mib_scores(model, graph, pair)
    assert scores["cpr"] == pytest.approx(curve.cpr) and scores["cmd"] == pytest.approx(faithfulness_curve(model, graph, pair, by="abs").cmd)


def test_denoising_restores_the_circuit_into_the_corrupted_run(setup):
    model, pair = setup
    graph = Graph.from_model(model)
    row = evaluate_circuit(model, graph, pair, direction="denoising").table.iloc[0]
    assert row["m_circuit"] == pytest.approx(row["m_clean"], rel=1e-12)  # every edge restored


def test_a_circuit_of_another_model_is_an_error(setup):
    model, pair = setup
    with pytest.raises(ValueError, match="the graph's language tower is"):
        evaluate_circuit(model, Graph.from_shapes(7, 3), pair)
