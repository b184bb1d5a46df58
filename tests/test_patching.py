"""Head sweeps: the shared-prefix batched sweep equals one full patched forward per head, and
attribution patching is the first-order change of the metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.metrics import masked_nll
from hooked_vlm.patching import answer_nll_metric, head_attribution, head_patching_sweep, naive_head_patching

ANSWER = "[0.12, 0.30, 0.55, 0.91]"


@pytest.fixture(scope="module", params=["llava_multilayer", "llava_base"])
def pair(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    source_image = photos["chelsea"]
    base_image = photos["coffee"].resize(source_image.size)  # same size: same token layout
    base = model.prepare(base_image, "Where is the cat?", answers=ANSWER)
    source = model.prepare(source_image, "Where is the cat?", answers=ANSWER)
    after_image = torch.arange(int(base.layout.position.max()) + 1, base.input_ids.shape[1])
    return model, base, source, after_image


def test_sweep_equals_one_patched_forward_per_head(pair):
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    fast = head_patching_sweep(model, base, source, metric, positions, batch_size=4)
    slow = naive_head_patching(model, base, source, metric, positions)
    assert fast.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert not torch.isnan(fast).any()
    assert (fast - slow).abs().max() <= 1e-5 * max(1.0, slow.abs().max().item())
    assert fast.std() > 0  # heads differ: the sweep is not returning one number


def test_language_model_started_at_a_layer_continues_the_full_run(pair):
    """What the sweep relies on: blocks L.. run from the cached `hook_resid_pre` of block L give
    the full run's logits; an out-of-range layer is an error."""
    model, base, _, _ = pair
    logits, cache = model.run_with_cache(base, names_filter=lambda name: name.endswith("hook_resid_pre"))
    mask, position_ids = base.attention_mask, base.position_ids
    for layer in range(model.cfg.n_layers):
        resumed = model.run_language_model(cache[f"blocks.{layer}.hook_resid_pre"], mask, position_ids, start_at_layer=layer)
        assert (resumed - logits).abs().max() <= 1e-5, layer
    with pytest.raises(IndexError, match="start_at_layer"):
        model.run_language_model(cache["blocks.0.hook_resid_pre"], mask, position_ids, start_at_layer=model.cfg.n_layers)


def test_sweep_of_a_subset_leaves_other_heads_empty(pair):
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    out = head_patching_sweep(model, base, source, metric, positions, heads=[(1, 0), (0, 1)])
    assert torch.isnan(out).sum() == out.numel() - 2 and not torch.isnan(out[0, 1])
    slow = naive_head_patching(model, base, source, metric, positions, heads=[(1, 0), (0, 1)])
    assert torch.allclose(out[~torch.isnan(out)], slow[~torch.isnan(slow)], atol=1e-5)


def test_patching_from_itself_changes_nothing(pair):
    model, base, _, positions = pair
    metric = answer_nll_metric(base)
    clean = masked_nll(model, base)[0]  # the metric of the unpatched run, computed independently
    out = head_patching_sweep(model, base, base, metric, positions)
    assert (out - clean).abs().max() <= 1e-6 * max(1.0, clean.abs().item())


def test_attribution_is_the_first_order_change_of_the_metric(pair):
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    scores = head_attribution(model, base, source, metric, positions)
    assert scores["language"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert scores["vision"].shape == (model.cfg.vision.n_layers, model.cfg.vision.n_heads)
    offset = int(positions.min())
    for tower, layer, head in (("language", 1, 0), ("vision", 0, 1)):
        prefix = "" if tower == "language" else "vision."
        name = f"{prefix}blocks.{layer}.attn.hook_z"
        _, cache = model.run_with_cache(source, names_filter=name)
        where = positions if tower == "language" else slice(None)

        def run(eps: float) -> float:
            def nudge(z, hook):
                z = z.clone()
                z[:, where, head] += eps * (cache[name][:, where, head] - z[:, where, head])
                return z

            with torch.no_grad():
                logits = model.run_with_hooks(base, fwd_hooks=[(name, nudge)])
            return metric(logits[:, offset:], offset)[0].double().item()

        eps = 1e-3
        finite_difference = (run(eps) - run(-eps)) / (2 * eps)
        estimate = scores[tower][layer, head].item()
        assert estimate == pytest.approx(finite_difference, rel=2e-2, abs=1e-4)


def test_bad_sweep_inputs_raise(pair, photos):
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    with pytest.raises(IndexError, match="layer 99 out of range"):
        head_patching_sweep(model, base, source, metric, positions, heads=[(99, 0)])
    with pytest.raises(IndexError, match="head 99 out of range"):
        head_patching_sweep(model, base, source, metric, positions, heads=[(0, 99)])
    with pytest.raises(TypeError, match=r"\(layer, head\) pairs expected"):
        head_patching_sweep(model, base, source, metric, positions, heads=[0, 1])
    other = model.prepare(photos["grace_hopper_tall"], "Where is the cat in this tall photo?", answers=ANSWER)
    with pytest.raises(ValueError, match="different token layouts"):
        head_patching_sweep(model, base, other, metric, positions)
    with pytest.raises(ValueError, match="carry no answer"):
        answer_nll_metric(model.prepare(photos["coffee"], "x"))


def test_sweep_heads_may_be_numpy_or_torch_integers(pair):
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    plain = head_patching_sweep(model, base, source, metric, positions, heads=[(0, 1), (1, 0)])
    mixed = head_patching_sweep(model, base, source, metric, positions, heads=[(np.int64(0), torch.tensor(1)), (torch.tensor(1), np.int32(0))])
    assert torch.equal(plain.isnan(), mixed.isnan()) and torch.equal(plain.nan_to_num(), mixed.nan_to_num())
    generated = head_patching_sweep(model, base, source, metric, positions, heads=((layer, head) for layer, head in [(0, 1), (1, 0)]))
    assert (~generated.isnan()).sum() == 2 and torch.equal(plain.nan_to_num(), generated.nan_to_num())  # a generator is read once


@pytest.mark.parametrize("qk_fix", [True, False])
def test_pattern_attribution_is_the_derivative_along_its_own_path(pair, qk_fix):
    """With the QK fix the estimate is linear in the attention pattern (the softmax is taken
    exactly); without it, linear in the pre-softmax scores. Each is the derivative of the metric
    along its own interpolation from the base to the source."""
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    scores = head_attribution(model, base, source, metric, positions, node="pattern", qk_fix=qk_fix)
    offset = int(positions.min())
    suffix = "hook_pattern" if qk_fix else "hook_attn_scores"
    for tower, layer, head in (("language", 1, 1), ("vision", 0, 0)):
        name = f"{'' if tower == 'language' else 'vision.'}blocks.{layer}.attn.{suffix}"
        _, cache = model.run_with_cache(source, names_filter=name)
        rows = positions if tower == "language" else slice(None)

        def run(eps: float) -> float:
            def nudge(x, hook):
                x = x.clone()
                x[:, head, rows] += eps * (cache[name][:, head, rows] - x[:, head, rows]).nan_to_num(0.0)
                return x

            with torch.no_grad():
                logits = model.run_with_hooks(base, fwd_hooks=[(name, nudge)])
            return metric(logits[:, offset:], offset)[0].item()

        eps = 1e-3
        estimate = scores[tower][layer, head].item()
        assert estimate == pytest.approx((run(eps) - run(-eps)) / (2 * eps), rel=2e-2, abs=1e-4)


def test_qk_fix_tracks_the_exact_effect_of_replacing_patterns_better(pair):
    """AtP*'s point: through a saturating softmax the linear estimate misses effects."""
    model, base, source, positions = pair
    metric = answer_nll_metric(base)
    offset = int(positions.min())
    with torch.no_grad():
        clean = metric(model(base)[:, offset:], offset)[0].item()
    _, cache = model.run_with_cache(source, names_filter=lambda n: n.startswith("blocks.") and n.endswith("hook_pattern"))
    exact = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_pattern"
        for head in range(model.cfg.n_heads):

            def replace(x, hook, name=name, head=head):
                x = x.clone()
                x[:, head, positions] = cache[name][:, head, positions]
                return x

            with torch.no_grad():
                exact[layer, head] = metric(model.run_with_hooks(base, fwd_hooks=[(name, replace)])[:, offset:], offset)[0] - clean
    fixed = head_attribution(model, base, source, metric, positions, towers=("language",), node="pattern")["language"]
    plain = head_attribution(model, base, source, metric, positions, towers=("language",), node="pattern", qk_fix=False)["language"]
    assert (fixed - exact).abs().mean() <= (plain - exact).abs().mean()
