"""Mixture-of-experts interventions and experiments: expert ablation (drop, renormalise, reroute),
router patching, expert usage, expert attribution; an existing token experiment runs unchanged
on a MoE model (head mediation: tests/test_experiments_heads.py, parametrised over one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_reference import assert_same_generation, generate_without_cache
from test_experiments_tokens import ABLATION_LABELS, ablation_counts, localization_columns

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.experiments import token_ablation
from hooked_vlm.patching import answer_nll_metric, expert_attribution

ANSWER = "[0.12, 0.30, 0.55, 0.91]"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe"))


@pytest.fixture(scope="module")
def pair(model, photos):
    source_image = photos["chelsea"]
    base_image = photos["coffee"].resize(source_image.size)  # same size: same token layout
    base = model.prepare(base_image, "Where is the cat?", answers=ANSWER)
    source = model.prepare(source_image, "Where is the cat?", answers=ANSWER)
    return base, source


def _cache(model, inputs, names, hooks=()):
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(inputs, names_filter=names)
    return cache


def _close(a, b, atol=1e-5):
    return (a - b).abs().max().item() <= atol


# ------------------------------------------------------------------------------ expert ablation
def test_drop_removes_exactly_the_experts_outputs(model, pair):
    base, _ = pair
    names = ["blocks.1.mlp.hook_expert_out", "blocks.1.hook_mlp_out"]
    clean = _cache(model, base, names)
    dropped = _cache(model, base, names, iv.expert_ablation(model, [(1, 2), (1, 5)]))
    expected = clean["blocks.1.hook_mlp_out"] - clean["blocks.1.mlp.hook_expert_out"][..., [2, 5], :].sum(-2)
    assert _close(dropped["blocks.1.hook_mlp_out"], expected)
    assert (dropped["blocks.1.mlp.hook_expert_out"][..., [2, 5], :] == 0).all()


def test_renormalise_rescales_the_remaining_experts_to_the_same_total(model, pair):
    base, _ = pair
    name = "blocks.0.mlp.hook_router_weights"
    clean = _cache(model, base, name)[name]
    ablated = _cache(model, base, name, iv.expert_ablation(model, [(0, 3)], mode="renormalise"))[name]
    hit = clean[..., 3] != 0
    assert hit.any() and (ablated[..., 3] == 0).all()
    assert _close(ablated.sum(-1), clean.sum(-1), 1e-6)  # 1 per token: norm_topk_prob
    expected = clean[hit] * (1 / (1 - clean[hit][:, 3]))[:, None]
    expected[:, 3] = 0
    assert _close(ablated[hit], expected, 1e-6) and torch.equal(ablated[~hit], clean[~hit])


def test_reroute_gives_the_token_its_next_best_expert(model, pair):
    base, _ = pair
    names = ["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_router_weights"]
    clean = _cache(model, base, names)
    rerouted = _cache(model, base, names, iv.expert_ablation(model, [(0, 3)], mode="reroute"))["blocks.0.mlp.hook_router_weights"]
    logits = clean["blocks.0.mlp.hook_router_logits"].clone()
    logits[..., 3] = float("-inf")
    top = F.softmax(logits, -1).topk(2)
    expected = torch.zeros_like(rerouted).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    assert _close(rerouted, expected, 1e-6)
    assert ((rerouted != 0).sum(-1) == 2).all() and (rerouted[..., 3] == 0).all()


def test_reroute_refuses_to_prune_more_experts_than_a_token_can_spare(model, pair):
    """8 experts, top-2: pruning 7 leaves no second expert to take (pruning all 8 used to route
    every token to two arbitrary experts with weight 1/2 each, a silent wrong answer)."""
    for pruned in (7, 8):
        with pytest.raises(ValueError, match=rf"prunes {pruned} of layer 0's 8 experts, leaving {8 - pruned}, fewer than the 2"):
            iv.expert_ablation(model, [(0, e) for e in range(pruned)], mode="reroute")
    assert len(iv.expert_ablation(model, [(0, e) for e in range(6)], mode="reroute")) == 1  # 2 left: fine


def test_ablation_at_positions_only_touches_those_positions(model, pair):
    base, _ = pair
    name = "blocks.1.hook_mlp_out"
    where = iv.image_tokens(base)
    clean = _cache(model, base, name)[name]
    ablated = _cache(model, base, name, iv.expert_ablation(model, [(1, e) for e in range(8)], positions=where))[name]
    assert (ablated[where.mask] == 0).all()  # every expert dropped: no MLP output left
    first_image = int(base.layout.position.min())
    # before the image: untouched, up to rounding (the experts' grouped matmuls see fewer tokens, and
    # on some CPUs a matmul's rows round differently with its number of rows: 1.4e-6 of 27.6 seen)
    torch.testing.assert_close(ablated[0, :first_image], clean[0, :first_image], rtol=1e-5, atol=1e-5)


def test_ablation_holds_on_every_decoding_step(model, pair):
    base, _ = pair
    hooks = iv.expert_ablation(model, [(0, 1), (1, 6)], mode="reroute")
    cached = model.generate(base, max_new_tokens=6, fwd_hooks=hooks, return_tokens=True)
    assert_same_generation(cached, generate_without_cache(model, base, 6, hooks), model.cfg.eos_token_ids)


def test_bad_expert_arguments_raise(model, tiny_checkpoint):
    with pytest.raises(IndexError, match="expert 8 out of range: layer 0 has 8 experts"):
        iv.expert_ablation(model, [(0, 8)])
    with pytest.raises(IndexError, match="layer 5 out of range"):
        iv.expert_ablation(model, [(5, 0)])
    with pytest.raises(TypeError, match=r"\(layer, expert\) pairs expected"):
        iv.expert_ablation(model, [3])
    with pytest.raises(ValueError, match="unknown expert ablation mode 'zero'"):
        iv.expert_ablation(model, [(0, 0)], mode="zero")
    top1 = HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe_top1"))
    with pytest.raises(ValueError, match=r"layers \[1\] have a dense MLP"):
        iv.expert_ablation(top1, [(1, 0)])
    dense = HookedVLM.from_pretrained(tiny_checkpoint("internvl_300m"))
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        iv.expert_ablation(dense, [(0, 0)])


def test_a_mean_at_the_dense_mlp_of_a_moe_model_fits_it(tiny_checkpoint, photos):
    """internvl_moe_top1's layer 1 is dense and 96 wide, its experts 32: a mean of its hook_post
    is 96 wide (it used to be refused as not the experts' 32), one of the routing weights 4."""
    top1 = HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe_top1"))
    inputs = top1.prepare(photos["rocket"], "Where is the rocket?")
    image = iv.image_tokens(inputs)
    for hook, shape in (("blocks.1.mlp.hook_post", (96,)), ("blocks.0.mlp.hook_router_weights", (4,))):
        mean = iv.compute_mean_embedding(top1, [photos["rocket"]], hook=hook, progress=False)
        assert tuple(mean.vector.shape) == shape
        with top1.hooks(fwd_hooks=iv.token_ablation(top1, image, mean, hook=hook)):
            _, cache = top1.run_with_cache(inputs, names_filter=hook)
        assert torch.equal(cache[hook][image.mask], mean.vector.expand(int(image.mask.sum()), -1))
    with pytest.raises(ValueError, match=r"has shape \(4,\).*carries \(96,\)"):
        iv.token_ablation(top1, image, mean, hook="blocks.1.mlp.hook_post")


# ------------------------------------------------------------------------------ router patching
def test_router_patch_runs_the_source_experts_on_the_base_hidden_states(model, pair):
    base, source = pair
    where = iv.TokenSet(iv.after_image(base).mask)  # the prompt after the image (no generated tokens)
    names = [f"blocks.{l}.mlp.hook_router_weights" for l in range(2)] + ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    src = _cache(model, source, names)
    patched = _cache(model, base, names, iv.router_patch(model, base, source, positions=where))
    clean = _cache(model, base, names)
    for layer in range(2):
        name = f"blocks.{layer}.mlp.hook_router_weights"
        assert torch.equal(patched[name][where.mask], src[name][where.mask])
        assert torch.equal(patched[name][~where.mask], clean[name][~where.mask])
    # at a patched position: the source's experts and weights applied to the base's hidden state
    mlp, pos = model.blocks[1].mlp, int(where.positions()[-1])
    x, weights = patched["blocks.1.ln2.hook_normalized"][0, pos : pos + 1], src["blocks.1.mlp.hook_router_weights"][0, pos]
    expected = sum(weights[e] * mlp.expert(x, e)[0] for e in weights.nonzero().flatten().tolist())
    assert _close(patched["blocks.1.hook_mlp_out"][0, pos], expected)


def test_router_patch_from_itself_changes_nothing_and_from_another_image_something(model, pair):
    base, source = pair
    with torch.no_grad():
        clean = model(base)
        assert torch.equal(model.run_with_hooks(base, fwd_hooks=iv.router_patch(model, base, base)), clean)
        assert not torch.equal(model.run_with_hooks(base, fwd_hooks=iv.router_patch(model, base, source, layers=0)), clean)


# ------------------------------------------------------------------------------ expert usage
def test_expert_usage_counts_each_tokens_selected_experts(model, pair, tiny_checkpoint):
    base, _ = pair
    selected = iv.expert_usage(model, base)
    assert selected.shape == (2, 8) and torch.allclose(selected.sum(-1), torch.tensor(2.0, dtype=torch.float64))
    weight = iv.expert_usage(model, base, iv.image_tokens(base), statistic="weight")
    assert torch.allclose(weight.sum(-1), torch.tensor(1.0, dtype=torch.float64))  # norm_topk_prob
    name = "blocks.0.mlp.hook_router_weights"
    image = _cache(model, base, name)[name][iv.image_tokens(base).mask]
    assert torch.allclose(weight[0], image.double().mean(0))
    top1 = HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe_top1"))
    usage = iv.expert_usage(top1, top1.prepare(base.images, base.text, raw=True))
    assert usage[1].isnan().all() and not usage[[0, 2]].isnan().any()  # layer 1 is dense


# ------------------------------------------------------------------------------ attribution
@pytest.mark.parametrize("against", ["source", "drop"])
def test_expert_attribution_is_the_first_order_change_of_the_metric(model, pair, against):
    base, source = pair
    positions = torch.arange(int(base.layout.position.max()) + 1, base.input_ids.shape[1])
    metric = answer_nll_metric(base)
    scores = expert_attribution(model, base, source if against == "source" else None, metric, positions)
    assert scores.shape == (model.cfg.n_layers, 8) and not scores.isnan().any() and scores.std() > 0
    offset = int(positions.min())
    for layer, expert in ((0, int(scores[0].abs().argmax())), (1, int(scores[1].abs().argmax()))):
        name = f"blocks.{layer}.mlp.hook_expert_out"
        target = _cache(model, source, name)[name] if against == "source" else None

        def run(eps: float) -> float:
            def nudge(out, hook):
                out = out.clone()
                goal = torch.zeros_like(out[:, positions, expert]) if target is None else target[:, positions, expert]
                out[:, positions, expert] += eps * (goal - out[:, positions, expert])
                return out

            with torch.no_grad():
                logits = model.run_with_hooks(base, fwd_hooks=[(name, nudge)])
            return metric(logits[:, offset:], offset)[0].double().item()

        eps = 1e-3
        finite_difference = (run(eps) - run(-eps)) / (2 * eps)
        assert scores[layer, expert].item() == pytest.approx(finite_difference, rel=2e-2, abs=1e-4)


# ------------------------------------------------------------------------------ experiments
def test_token_ablation_experiment_runs_unchanged_on_a_moe_model(model):
    """Object, random and integrated-gradients (gradients through every expert) conditions."""
    dataset = SyntheticLocalization(3, seed=0, image_sizes=((112, 56),))
    kwargs = dict(strategies=("object", "random", "ig"), paddings=(1,), fractions=(0.25,), seeds=(0,), ig_steps=4)
    kwargs |= dict(ig_baseline="zero", fill="zero")
    results = token_ablation(model, dataset, batch_size=2, progress=False, **kwargs)
    assert list(results.columns) == localization_columns(model) + ABLATION_LABELS + ablation_counts(model)
    assert sorted(results.condition.unique()) == ["baseline", "ig 25%", "object+1", "random 25% s0"]
    assert results.groupby("condition").size().eq(3).all() and results["n_image_tokens"].gt(0).all()
    baseline = results[results.condition == "baseline"].set_index("sample_id")["response"]
    ablated = results[results.condition == "object+1"].set_index("sample_id")["response"]
    assert (ablated != baseline.loc[ablated.index]).any()


def test_the_readme_example_runs_on_a_tiny_moe(model, pair, photos):
    """README "Mixture-of-experts models", on the 2-layer, 8-expert checkpoint."""
    from test_readme import example

    base, source = pair
    code = example("Mixture-of-experts models")
    for old, new in {"(20, 17), (20, 96)": "(1, 2), (1, 5)", "range(10, 20)": "range(0, 2)"}.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    inputs = model.prepare(photos["chelsea"], "Where is the cat?")
    namespace = dict(model=model, inputs=inputs, box=(50, 60, 250, 280), base=base, source=source)
    exec(code, namespace)
    assert namespace["usage"].shape == namespace["scores"].shape == (2, 8)
    assert len(namespace["texts"]) == 1 and len(namespace["patch"]) == 2
