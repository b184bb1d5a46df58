"""Head-level experiments: mediation fractions (exact and attribution) and cumulative head ablation."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.data.prompts import localization_answer
from hooked_vlm.experiments import box_format, evaluate
from hooked_vlm.experiments.cumulative_head_ablation import cumulative_head_ablation, heads_to_remove, normalised_auc
from hooked_vlm.experiments.data import as_samples
from hooked_vlm.experiments.head_mediation import head_mediation, mediation_map, rank_heads, unreachable_layers
from hooked_vlm.metrics import masked_nll

MEDIATION_COLUMNS = {"pair_id", "class_name", "layer", "head", "mf", "p_base", "p_src", "p_patched", "method", "task",
                     "positions", "target", "target_source"}  # fmt: skip


@pytest.fixture(scope="module", params=["llava_multilayer", "internvl_6b", "internvl_moe"])
def model(request, tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint(request.param))


@pytest.fixture(scope="module")
def pairs():
    return SyntheticLocalization(2, seed=3, image_sizes=((112, 56),))


@pytest.fixture
def eager(model):
    """Both sides with eager attention: the same sums in the same order. (With SDPA the NLLs still
    agree to ~1e-6, but MF divides by P_base - P_src, and these random models have P ~ 1e3-1e4 with
    differences of a few percent, which amplifies that rounding to ~2e-5.)"""
    model.set_attention_implementation("eager")
    yield model
    model.set_attention_implementation("auto")


def test_exact_mediation_equals_a_naive_loop_of_patched_forwards(eager, pairs):
    model = eager
    results = head_mediation(model, pairs, target="gt", progress=False)
    assert set(results.columns) == MEDIATION_COLUMNS
    assert len(results) == len(pairs) * model.cfg.n_layers * model.cfg.n_heads
    for sample in as_samples(pairs):
        rows = results[results.pair_id == sample.id]
        answer = rows.target.iloc[0]
        prompt = f"Please provide the bounding box coordinates of the {sample.class_name}."
        source = model.prepare(sample.image, prompt, answers=answer)
        base = model.prepare(sample.removed_image, prompt, answers=answer)
        first_answer = int(torch.nonzero(base.answer_mask[0])[0])
        positions = torch.arange(int(base.layout.position.max()) + 1, first_answer)  # the prompt after the image
        _, cache = model.run_with_cache(source, names_filter=lambda n: n.startswith("blocks.") and n.endswith("hook_z"))
        p_base = masked_nll(model, base, token_filter="digits").exp()
        p_src = masked_nll(model, source, token_filter="digits").exp()
        for _, row in rows.iterrows():
            name = f"blocks.{int(row['layer'])}.attn.hook_z"

            def patch(z, hook, name=name, head=int(row["head"])):
                z = z.clone()
                z[:, positions, head] = cache[name][:, positions, head]
                return z

            p_patched = masked_nll(model, base, token_filter="digits", fwd_hooks=[(name, patch)]).exp()
            assert row["p_patched"] == pytest.approx(p_patched.item(), rel=1e-5)
            if row["layer"] == model.cfg.n_layers - 1:  # the patch cannot reach the digits: not measured
                assert np.isnan(row["mf"]) and p_patched.item() == pytest.approx(p_base.item(), rel=1e-6)
            else:
                mf = ((p_base - p_patched) / (p_base - p_src)).item()
                assert row["mf"] == pytest.approx(mf, abs=1e-5, rel=1e-5)


def test_attribution_mediation_covers_every_head(model, pairs):
    results = head_mediation(model, pairs, method="attribution", target="gt", positions="prompt+answer", progress=False)
    assert set(results.columns) == MEDIATION_COLUMNS and (results.method == "attribution").all()
    assert results.mf.notna().all() and mediation_map(results).shape == (model.cfg.n_layers, model.cfg.n_heads)


def _nan_layers(results: pd.DataFrame) -> dict[int, bool]:
    """Per layer: True if every head's MF is NaN on every pair, False if none is (else an error)."""
    by_layer = results.groupby("layer").mf.agg(lambda mf: mf.isna().mean())
    assert set(by_layer) <= {0.0, 1.0}, by_layer
    return {int(layer): share == 1.0 for layer, share in by_layer.items()}


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_prompt_positions_leave_exactly_the_last_layers_heads_unmeasured(model, pairs, method):
    """The last layer's output at the prompt positions reaches only their own logits, which
    predict the prompt and the answer's template opening, never a scored digit: NaN, not 0.
    Every earlier layer reaches the digits through a later layer's attention: measured."""
    results = head_mediation(model, pairs, method=method, target="gt", progress=False)
    last = model.cfg.n_layers - 1
    assert _nan_layers(results) == {layer: layer == last for layer in range(model.cfg.n_layers)}
    unmeasured = results[results.layer == last]
    assert (unmeasured.p_patched == unmeasured.p_base).all()  # what the patch leaves unchanged
    assert _nan_layers(head_mediation(model, pairs, method=method, target="gt", positions="prompt+answer", progress=False)) == {
        layer: False for layer in range(model.cfg.n_layers)
    }


def test_exact_and_attribution_leave_the_same_heads_unmeasured(model, pairs):
    exact, attribution = (head_mediation(model, pairs, method=m, target="gt", progress=False) for m in ("exact", "attribution"))
    assert exact.mf.isna().any() and exact.mf.isna().tolist() == attribution.mf.isna().tolist()


def test_binary_mediation_scores_the_decisive_token(model, pairs):
    results = head_mediation(model, pairs, task="binary", positions="prompt+answer", target="gt", progress=False)
    assert set(results.target) == {"Yes"} and results.p_base.gt(0).all()


def test_binary_mediation_at_the_prompt_measures_the_last_layer_too(model, pairs):
    """The scored "Yes" is predicted from the last prompt position, which the last layer's heads
    write to; with positions="answer" no head can reach it, which is an error."""
    results = head_mediation(model, pairs, task="binary", target="gt", progress=False)
    assert results.mf.notna().all()
    with pytest.raises(ValueError, match="no head's patch reaches a scored token"):
        head_mediation(model, pairs, task="binary", positions="answer", target="gt", progress=False)


def test_unreachable_layers_follow_where_a_patch_can_flow():
    scored = torch.tensor([[False] * 6 + [True, True, False]])  # tokens 6 and 7, predicted at 5 and 6
    assert unreachable_layers(3, torch.arange(2, 5), scored).tolist() == [False, False, True]
    assert unreachable_layers(3, torch.arange(2, 6), scored).tolist() == [False, False, False]
    assert unreachable_layers(3, torch.tensor([7]), scored).tolist() == [True, True, True]


def test_mediation_map_averages_the_measured_pairs_and_keeps_unmeasured_heads_nan():
    nan = float("nan")
    results = pd.DataFrame({"pair_id": [0, 0, 0, 0, 1, 1, 1, 1], "layer": [0, 0, 1, 1] * 2, "head": [0, 1] * 4,
                            "mf": [0.2, nan, nan, 0.5, 0.4, 0.1, nan, 0.7]})  # fmt: skip
    mf = mediation_map(results)
    assert torch.isnan(mf[1, 0]) and torch.allclose(mf[[0, 0, 1], [0, 1, 1]], torch.tensor([0.3, 0.1, 0.6]))


def test_rank_heads_orders_measured_heads_by_value_and_by_least_magnitude():
    values = torch.tensor([[0.5, -2.0], [float("nan"), 0.1]])
    assert rank_heads(values) == [(0, 0), (1, 1), (0, 1)]  # negatives not "top"; the NaN head not ranked
    assert rank_heads(values, by="least_abs") == [(1, 1), (0, 0), (0, 1)]
    assert rank_heads(values, 2, by="least_abs") == [(1, 1), (0, 0)]


def test_cumulative_ablation_removes_the_ranked_heads(model, pairs):
    ranking = torch.arange(model.cfg.n_layers * model.cfg.n_heads, dtype=torch.float32).view(model.cfg.n_layers, model.cfg.n_heads)
    results = cumulative_head_ablation(model, pairs, {"by_index": ranking}, task="list", fractions=(0, 0.5, 1.0),
                                       low_importance_from="by_index", progress=False)  # fmt: skip
    assert {"ranking", "fraction", "n_heads_removed"} <= set(results.columns)
    assert set(results.ranking) == {"by_index", "low_importance"}
    n = model.cfg.n_layers * model.cfg.n_heads
    assert sorted(results.n_heads_removed.unique()) == [0, -(-n // 2), n]  # ceil: at least the fraction
    baseline = evaluate(model, pairs, "list", progress=False)
    at_zero = results[(results.fraction == 0) & (results.ranking == "by_index")]
    assert list(at_zero.response) == list(baseline.response)
    everything = results[(results.fraction == 1.0) & (results.ranking == "by_index")]
    assert list(everything.response) != list(baseline.response)


def _ablated_heads(monkeypatch) -> list[list[tuple[int, int]]]:
    """Records the heads of every `head_ablation` the cumulative ablation attaches."""
    module = importlib.import_module("hooked_vlm.experiments.cumulative_head_ablation")
    calls = []
    monkeypatch.setattr(module, "head_ablation", lambda model, heads, value: calls.append(sorted(heads)) or [])
    return calls


def test_low_importance_control_chooses_among_measured_heads_only(model, pairs, monkeypatch):
    """The last layer unmeasured (NaN, as at the prompt positions), every other head measured
    with MF growing with its index: the top ranking removes the last measured heads first, the
    control the first ones, and neither ever a NaN head, even when they remove every measured one."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    mf = torch.arange(1, n_layers * n_heads + 1, dtype=torch.float32).view(n_layers, n_heads)
    mf[-1] = float("nan")
    measured = [(layer, head) for layer in range(n_layers - 1) for head in range(n_heads)]
    every_measured = len(measured) / (n_layers * n_heads)
    calls = _ablated_heads(monkeypatch)
    cumulative_head_ablation(model, pairs, {"mf": mf}, task="list", fractions=(0, 0.25, every_measured),
                             low_importance_from="mf", batch_size=len(pairs), progress=False)  # fmt: skip
    k = heads_to_remove(0.25, n_layers * n_heads)
    assert calls == [measured[-k:], measured[:k], measured, measured]  # (top, control) at 0.25, then at every measured head


def test_a_fraction_beyond_the_measured_heads_is_an_error_before_anything_runs(model, pairs, monkeypatch):
    module = importlib.import_module("hooked_vlm.experiments.cumulative_head_ablation")
    monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated before checking the fractions"))
    monkeypatch.setattr(module, "_prompt_means", lambda *args, **kwargs: pytest.fail("ran a forward before checking the fractions"))
    mf = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    mf[-1] = float("nan")
    n, measured = mf.numel(), (model.cfg.n_layers - 1) * model.cfg.n_heads
    for value in ("zero", "mean"):
        with pytest.raises(ValueError, match=rf"ranking 'mf' measures {measured} of {n} heads \(the others are NaN: not measured"):
            cumulative_head_ablation(model, pairs, {"mf": mf}, fractions=(0, 1.0), low_importance_from="mf", value=value, progress=False)


def test_cumulative_ablation_passes_frame_and_max_new_tokens_to_evaluate(model, pairs, monkeypatch):
    module = importlib.import_module("hooked_vlm.experiments.cumulative_head_ablation")  # the package exports the function
    frame = "padded" if model.cfg.family == "llava" else "original"  # llava_multilayer crops by default
    calls = []
    monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: calls.append(kwargs) or evaluate(*args, **kwargs))
    ranking = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    results = cumulative_head_ablation(model, pairs, {"all": ranking}, fractions=(0, 0.5), frame=frame, max_new_tokens=3, progress=False)
    assert [(c["frame"], c["max_new_tokens"]) for c in calls] == [(frame, 3), (frame, 3)]
    expected = evaluate(model, pairs, frame=frame, max_new_tokens=3, progress=False)
    assert list(results[results.fraction == 0].response) == list(expected.response)


def test_head_mediation_writes_the_target_box_in_the_given_frame(model, pairs):
    frame = "padded" if model.cfg.family == "llava" else "original"
    results = head_mediation(model, pairs, method="attribution", target="gt", frame=frame, progress=False)
    expected = {s.id: localization_answer(s.box, s.image_size, s.class_name, **box_format(model, frame)) for s in as_samples(pairs)}
    assert results.groupby("pair_id").target.first().to_dict() == expected
    if model.cfg.family == "llava":
        assert expected != {s.id: localization_answer(s.box, s.image_size, s.class_name, **box_format(model)) for s in as_samples(pairs)}


def test_cumulative_mean_ablation_uses_the_prompt_means_of_the_dataset(model, pairs):
    """value="mean": every head replaced by its mean `z` over the dataset's prompts; the same as
    `head_ablation` with means computed by `mean_head_activations` over those prompts."""
    from hooked_vlm.experiments.evaluate import MAX_NEW_TOKENS, task_prompt
    from hooked_vlm.interventions import head_ablation, mean_head_activations

    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    ranking = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    results = cumulative_head_ablation(model, pairs, {"all": ranking}, task="list", fractions=(1.0,), value="mean", progress=False)
    samples = list(as_samples(pairs))
    inputs = model.prepare([s.image for s in samples], [task_prompt("list", s) for s in samples])
    means = mean_head_activations(model, inputs)
    expected = model.generate(inputs, max_new_tokens=MAX_NEW_TOKENS["list"], fwd_hooks=head_ablation(model, heads, means))
    assert list(results.response) == expected
    zeroed = cumulative_head_ablation(model, pairs, {"all": ranking}, task="list", fractions=(1.0,), progress=False)
    assert list(zeroed.response) != expected
    with pytest.raises(ValueError, match="unknown head ablation value"):
        cumulative_head_ablation(model, pairs, {"all": ranking}, value="median", progress=False)


def test_normalised_auc_is_the_mean_relative_score():
    frame = pd.DataFrame({"ranking": ["a"] * 3 + ["b"] * 3, "fraction": [0, 0.5, 1.0] * 2,
                          "loc_score": [1.0, 0.5, 0.0, 0.8, 0.8, 0.8]})  # fmt: skip
    auc = normalised_auc(frame)
    assert auc["a"] == pytest.approx(0.5) and auc["b"] == pytest.approx(1.0)


def test_the_head_count_is_the_ceiling_of_the_exact_share():
    assert heads_to_remove(0.07, 1600) == 112  # 0.07 * 1600 is 112.00000000000001 in floats
    assert heads_to_remove(0.01, 1024) == 11 and heads_to_remove(0.5, 7) == 4
    assert heads_to_remove(0.0, 1600) == 0 and heads_to_remove(1.0, 1600) == 1600


def test_normalised_auc_is_nan_when_the_unablated_score_is_zero():
    frame = pd.DataFrame({"ranking": ["a"] * 3 + ["b"] * 3, "fraction": [0, 0.5, 1.0] * 2,
                          "correct": [0.0, 0.0, 0.0, 1.0, 0.5, 0.0]})  # fmt: skip
    auc = normalised_auc(frame)
    assert np.isnan(auc["a"]) and auc["b"] == pytest.approx(0.5)


def test_an_empty_dataset_is_a_clear_error(model):
    ranking = {"x": torch.zeros(model.cfg.n_layers, model.cfg.n_heads)}
    with pytest.raises(ValueError, match="the dataset holds no sample"):
        head_mediation(model, [], progress=False)
    for value in ("zero", "mean"):
        with pytest.raises(ValueError, match="the dataset holds no sample"):
            cumulative_head_ablation(model, [], ranking, value=value, progress=False)


def test_bad_inputs_raise(model, pairs, photos):
    with pytest.raises(ValueError, match="shape"):
        cumulative_head_ablation(model, pairs, {"x": torch.zeros(1, 1)}, progress=False)
    with pytest.raises(ValueError, match="fractions"):
        cumulative_head_ablation(model, pairs, {"x": torch.zeros(model.cfg.n_layers, model.cfg.n_heads)}, fractions=(1.5,), progress=False)
    with pytest.raises(ValueError, match="no object-removed image"):
        from hooked_vlm.experiments.data import Sample

        lonely = Sample("x", photos["coffee"], "cup", (10, 10, 50, 50), mask_fn=lambda: None)
        head_mediation(model, [lonely], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        head_mediation(model, pairs, method="guess", progress=False)
