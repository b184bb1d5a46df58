"""PROTOCOL-AUDIT section A, one behaviour per test: each failed on the code before its fix.

Sampling (A1), the IG target and aggregation (A2, A3), excluded samples (A4), the InternVL
shuffle scope (A5), bounded probes (A6), answer length and truncation (A7), the mean fallback
(A8), the 24% level (A9), CLI defaults (A10), mean +- sd over seeds (A11), size classes and
cumulative controls (A12); and the section B options added since: frame calibration (B1),
substring matching (B3), robust CMA aggregates (B6), the knockout control (B8), InternVL float
boxes (B2) and the significant-digit CMA score (B5)."""

from __future__ import annotations

import inspect
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.cli import parser
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.experiments import evaluate, head_mediation, position_probe, summarize, token_ablation, token_shuffle
from hooked_vlm.experiments.attribution import integrated_gradients, teacher_forced_inputs
from hooked_vlm.experiments.cumulative_head_ablation import control_orders
from hooked_vlm.experiments.data import Sample, as_samples, sample_sources, size_class
from hooked_vlm.experiments.evaluate import MAX_NEW_TOKENS
from hooked_vlm.metrics import scored_tokens
from hooked_vlm.runs import MANIFEST


def _sample(index: int, class_name: str, image=None, image_id=None) -> Sample:
    image = image or Image.new("RGB", (64, 64))
    return Sample(f"s{index}", image, class_name, (10, 10, 40, 40), mask_fn=lambda: np.ones((64, 64), bool),
                  choices=("cat", "dog", "cow"), image_id=image_id)  # fmt: skip


@pytest.fixture(scope="module")
def by_class():
    """Twelve samples in COCO's order: grouped by class."""
    return [_sample(i, name) for i, name in enumerate(["cat"] * 4 + ["dog"] * 4 + ["cow"] * 4)]


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_multilayer"))
    model.preprocessing = replace(model.preprocessing, image_mode="pad")
    return model


@pytest.fixture(scope="module")
def cropping():
    """toy-llava in llava-hf's default centre-crop mode."""
    model = HookedVLM.from_pretrained("toy-llava")
    model.preprocessing = replace(model.preprocessing, image_mode="crop")
    return model


def _outside_the_crop() -> Sample:
    """An object in the left strip that the centre crop of a 640x427 image cuts off (A4)."""
    image = Image.new("RGB", (640, 427), "gray")
    return Sample("strip", image, "cat", (5, 100, 60, 160), mask_fn=lambda: np.ones((427, 640), bool),
                  choices=("cat", "dog"), removed_image=image.copy())  # fmt: skip


# ---------------------------------------------------------------------------------- A1
def test_limit_draws_a_seeded_random_subset_not_the_file_order(by_class):
    chosen = [sid for sid, _ in sample_sources(by_class, 4)]
    assert chosen != ["s0", "s1", "s2", "s3"] and len(chosen) == 4
    assert chosen == [sid for sid, _ in sample_sources(by_class, 4, sample_seed=0)]  # seeded
    assert chosen != [sid for sid, _ in sample_sources(by_class, 4, sample_seed=1)]
    assert chosen == sorted(chosen, key=lambda sid: int(sid[1:]))  # kept in the dataset's order
    assert [sid for sid, _ in sample_sources(by_class, 4, sample="first")] == ["s0", "s1", "s2", "s3"]


def test_stratified_sampling_gives_every_class_its_share(by_class):
    chosen = [int(sid[1:]) for sid, _ in sample_sources(by_class, 6, sample="stratified", sample_seed=5)]
    classes = [by_class[i].class_name for i in chosen]
    assert sorted(classes) == ["cat", "cat", "cow", "cow", "dog", "dog"]


def test_without_limit_every_sample_is_used_in_order_whatever_the_mode(by_class):
    for mode in ("first", "random", "stratified"):
        assert [sid for sid, _ in sample_sources(by_class, sample=mode)] == [s.id for s in by_class]
    with pytest.raises(ValueError, match="unknown sample 'shuffled'"):
        sample_sources(by_class, 3, sample="shuffled")


def test_head_mediation_takes_the_protocols_50_random_pairs_by_default():
    parameters = inspect.signature(head_mediation).parameters
    assert parameters["limit"].default == 50 and parameters["sample"].default == "random"
    args = parser().parse_args(["head-mediation", "--model", "m", "--out", "o"])
    assert (args.limit, args.sample, args.sample_seed) == (50, "random", 0)


def test_a_run_records_how_its_samples_were_chosen(llava, tmp_path):
    data = SyntheticLocalization(5, seed=0, image_sizes=((56, 56),))
    results = evaluate(llava, data, "list", limit=2, sample_seed=3, max_new_tokens=2, progress=False, run=tmp_path)
    import json

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["settings"]["sample"] == "random" and manifest["settings"]["sample_seed"] == 3
    assert list(results.sample_id) == [sid for sid, _ in sample_sources(data, 2, sample_seed=3)]


# ---------------------------------------------------------------------------------- A2, A3
def test_the_list_ig_target_leaves_out_the_end_of_turn_token(llava):
    samples = list(as_samples(SyntheticLocalization(1, seed=0, image_sizes=((56, 56),))))
    inputs, token_filter = teacher_forced_inputs(llava, samples, "list")
    scored = inputs.input_ids[scored_tokens(inputs, llava.tokenizer, token_filter)].tolist()
    assert set(scored).isdisjoint(llava.cfg.eos_token_ids)
    assert llava.tokenizer.decode(scored).strip() == samples[0].class_name


def test_first_logit_target_attributes_the_class_logit(llava):
    samples = list(as_samples(SyntheticLocalization(1, seed=0, image_sizes=((56, 56),))))
    inputs, _ = teacher_forced_inputs(llava, samples, "list")
    result = integrated_gradients(llava, inputs, torch.zeros(llava.cfg.text.d_model), steps=2, target="first_logit")
    first = int(inputs.answer_mask[0].int().argmax())
    with torch.no_grad():
        logit = llava(inputs)[0, first - 1, inputs.input_ids[0, first]]
    torch.testing.assert_close(result.f_input[0], logit.float())


def test_ig_scores_tokens_by_the_l1_norm_of_their_attribution_by_default(llava):
    samples = list(as_samples(SyntheticLocalization(1, seed=0, image_sizes=((56, 56),))))
    inputs, token_filter = teacher_forced_inputs(llava, samples, "localization")
    baseline = torch.zeros(llava.cfg.text.d_model)
    l1 = integrated_gradients(llava, inputs, baseline, steps=2, token_filter=token_filter).scores
    signed = integrated_gradients(llava, inputs, baseline, steps=2, token_filter=token_filter, reduce="sum").scores
    assert (l1 >= 0).all() and (signed < 0).any()
    assert (l1 >= signed.abs() - 1e-6).all()  # |sum| <= sum of |.|


# ---------------------------------------------------------------------------------- A4
def test_an_object_outside_the_crop_is_recorded_as_excluded_not_asked(cropping):
    inside = Sample("inside", Image.new("RGB", (640, 427)), "cat", (300, 100, 400, 200), mask_fn=lambda: None,
                    choices=("cat",), area=1e4)  # fmt: skip
    results = evaluate(cropping, [_outside_the_crop(), inside], "localization", max_new_tokens=2, progress=False)
    excluded = results.set_index("sample_id")["excluded"]
    assert "outside the model's view" in excluded["strip"] and pd.isna(excluded["inside"])
    assert pd.isna(results.set_index("sample_id")["response"]["strip"])
    assert summarize(results)["n"].iloc[0] == 1 and summarize(results)["n_excluded"].iloc[0] == 1


def test_ig_ablation_goes_on_past_an_object_outside_the_crop(cropping):
    results = token_ablation(cropping, [_outside_the_crop()], strategies=["ig"], fractions=[0.5], fill="zero",
                             ig_baseline="zero", ig_steps=1, max_new_tokens=2, progress=False)  # fmt: skip
    assert results["excluded"].str.contains("outside the model's view").all()


def test_head_mediation_records_a_pair_outside_the_crop_and_goes_on(cropping):
    results = head_mediation(cropping, [_outside_the_crop()], max_new_tokens=2, progress=False)
    assert len(results) == 1 and "outside" in results["excluded"].iloc[0] and pd.isna(results["layer"].iloc[0])


# ---------------------------------------------------------------------------------- A5
def test_the_sheet_scope_shuffles_internvl_tokens_across_tile_seams(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))
    inputs = model.prepare(Image.new("RGB", (112, 56)), "Hi")  # two tiles and a thumbnail
    views = iv.view_groups(inputs)[0]
    length = inputs.input_ids.shape[1]
    positions = torch.arange(length, dtype=torch.float32)[None, :, None]

    def moved_from(**grouping) -> torch.Tensor:
        (_, hook), = iv.token_shuffle(model, inputs, seed=0, **grouping)
        return hook(positions, SimpleNamespace(name="hook_inputs_embeds"))[0, :, 0].long()

    crossing = lambda source: bool((views[source] != views).any())
    assert not crossing(moved_from(per_view=True))
    sheet = moved_from(per_view=True, by_sheet=True)
    assert crossing(sheet)
    thumbnail = views == views[views >= 0].max()  # the last view: the thumbnail stays apart
    assert bool((views[sheet][thumbnail] == views[thumbnail]).all())
    assert inspect.signature(token_shuffle).parameters["scope"].default == "sheet"


# ---------------------------------------------------------------------------------- A6, A7, A9, A10
def test_probes_draw_a_bounded_number_of_tokens_per_image_by_default():
    assert inspect.signature(position_probe).parameters["tokens_per_image"].default == 16
    args = parser().parse_args(["position-probe", "--model", "m", "--out", "o", "--tokens-per-image", "8", "--lr", "0.1"])
    assert (args.tokens_per_image, args.lr) == (8, 0.1)


def test_answers_cut_by_max_new_tokens_are_marked_unfinished(llava):
    assert MAX_NEW_TOKENS["list"] == 128 and MAX_NEW_TOKENS["localization"] == 64
    data = SyntheticLocalization(2, seed=0, image_sizes=((56, 56),))
    results = evaluate(llava, data, "list", max_new_tokens=1, progress=False)
    assert results["finished"].eq(False).all() and summarize(results)["truncated"].iloc[0] == 1.0


def test_the_k_grid_holds_the_24_percent_level():
    assert 0.24 in inspect.signature(token_ablation).parameters["fractions"].default


@pytest.mark.parametrize("command, option, function", [
    ("token-ablation", "strategies", token_ablation), ("token-ablation", "paddings", token_ablation),
    ("token-ablation", "fractions", token_ablation), ("token-ablation", "ig_reduce", token_ablation),
    ("object-extension", "paddings", "object_extension"), ("attention-knockout", "seeds", "attention_knockout"),
])  # fmt: skip
def test_cli_defaults_equal_the_functions(command, option, function):
    from hooked_vlm import experiments

    function = getattr(experiments, function) if isinstance(function, str) else function
    args = parser().parse_args([command, "--model", "m", "--out", "o"])
    assert list(np.atleast_1d(getattr(args, option))) == list(np.atleast_1d(inspect.signature(function).parameters[option].default))


# ---------------------------------------------------------------------------------- A8
def test_the_mean_fallback_counts_each_image_once(llava, monkeypatch):
    shared, other = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    samples = [_sample(0, "cat", shared, "a"), _sample(1, "dog", shared, "a"), _sample(2, "cow", other, "b")]
    seen = []

    def capture(model, images, **kwargs):
        seen.extend(images)
        raise StopIteration  # enough: the images it was given

    monkeypatch.setattr(iv, "compute_mean_embedding", capture)
    with pytest.warns(UserWarning, match="mean=None"), pytest.raises(StopIteration):
        token_ablation(llava, samples, strategies=["object"], progress=False)
    assert seen == [shared, other]


# ---------------------------------------------------------------------------------- A11, A12
def test_seeded_conditions_summarise_as_mean_and_sd_over_seeds():
    rows = [{"task": "list", "condition": "baseline", "seed": None, "correct": c} for c in (True, False)]
    rows += [{"task": "list", "condition": f"random 8% s{s}", "seed": s, "correct": c}
             for s, values in enumerate([(True, True), (True, False), (False, False)]) for c in values]  # fmt: skip
    summary = summarize(pd.DataFrame(rows), over_seeds=True)
    assert summary.loc["random 8%", "accuracy_mean"] == pytest.approx(0.5)
    assert summary.loc["random 8%", "accuracy_sd"] == pytest.approx(0.5)  # sd of (1, 0.5, 0)
    assert summary.loc["random 8%", "n_seeds"] == 3 and summary.loc["baseline", "n_seeds"] == 1


def test_rows_carry_the_objects_area_and_coco_size_class(llava):
    results = evaluate(llava, SyntheticLocalization(2, seed=0, image_sizes=((56, 56),)), "list", max_new_tokens=2, progress=False)
    samples = list(as_samples(SyntheticLocalization(2, seed=0, image_sizes=((56, 56),))))
    assert list(results["area"]) == [float(s.mask.sum()) for s in samples]
    assert (size_class(31**2), size_class(32**2), size_class(96**2)) == ("small", "medium", "large")
    assert set(results["size_class"]) <= {"small", "medium", "large"}


def test_cumulative_controls_remove_negative_mf_heads_first_or_heads_at_random():
    scores = torch.tensor([[0.5, -0.9], [0.1, float("nan")]])
    orders = control_orders(scores, ["low_importance", "negative_mf", "random_heads"], seed=0)
    assert orders["low_importance"][0] == (1, 0) and orders["negative_mf"][0] == (0, 1)
    assert sorted(orders["random_heads"]) == [(0, 0), (0, 1), (1, 0)]  # the measured heads, none NaN


# ---------------------------------------------------------------------------------- section B
def test_calibrate_frame_scores_the_same_answers_in_each_frame_and_picks_the_best(cropping, monkeypatch):
    from hooked_vlm.experiments import calibrate_frame

    image = Image.new("RGB", (640, 427))
    inside = Sample("inside", image, "cat", (107, 0, 533, 427), mask_fn=lambda: None, choices=("cat",), area=1e4)
    whole_crop = cropping.tokenizer("[0.0, 0.0, 1.0, 1.0]", add_special_tokens=False).input_ids
    monkeypatch.setattr(cropping, "generate", lambda inputs, **kwargs: torch.tensor([whole_crop] * len(inputs)))
    frame, table = calibrate_frame(cropping, [inside], n=1, progress=False)
    assert frame == "crop" and table.loc["crop", "loc_score"] > table.loc["original", "loc_score"]
    assert table.attrs["sample_ids"] == ["inside"]


def test_the_papers_substring_rule_is_an_option():
    from hooked_vlm.scoring import classification_correct

    assert not classification_correct("a carrot", "car") and classification_correct("a carrot", "car", match="substring")
    assert classification_correct("two people", "person") and not classification_correct("two people", "person", match="substring")


def test_mediation_reports_robust_aggregates_and_how_many_pairs_were_dropped():
    from hooked_vlm.experiments import mediation_counts, mediation_map

    rows = [{"pair_id": p, "layer": 0, "head": 0, "mf": mf, "p_base": 2.0, "p_src": p_src, "p_patched": 2.0 - mf * (2.0 - p_src),
             "excluded": None} for p, mf, p_src in [("a", 1.0, 1.0), ("b", 0.0, 1.0), ("c", 10.0, 1.9), ("d", float("nan"), 2.0)]]  # fmt: skip
    rows.append({"pair_id": "e", "layer": None, "head": None, "mf": float("nan"), "excluded": "outside"})
    results = pd.DataFrame(rows)
    assert float(mediation_map(results)[0, 0]) == pytest.approx(11 / 3)
    assert float(mediation_map(results, "median")[0, 0]) == pytest.approx(1.0)
    assert float(mediation_map(results, "ratio_of_sums")[0, 0]) == pytest.approx((1 + 0 + 1) / (1 + 1 + 0.1))
    assert mediation_counts(results) == {"pairs": 5, "excluded": 1, "dropped": 1, "measured": 3}


def test_the_knockout_control_can_be_drawn_outside_the_object(llava, monkeypatch):
    from hooked_vlm.experiments import attention_knockout

    drawn = []
    real = iv.attention_knockout
    monkeypatch.setattr(iv, "attention_knockout", lambda model, source, target, **kw: drawn.append(target) or real(model, source, target, **kw))
    samples = list(as_samples(SyntheticLocalization(2, seed=0, image_sizes=((56, 56),))))
    attention_knockout(llava, samples, group_size="all", paddings=[1], seeds=[0], exclude_object=True, max_new_tokens=1, progress=False)
    inputs = llava.prepare([s.image for s in samples], ["Hi"] * 2)
    objects = iv.object_tokens(inputs, [s.mask for s in samples], dilation=1, allow_empty=True).mask
    control = drawn[-1].mask  # the random condition comes after its object condition
    assert control.any() and not (control[:, : objects.shape[1]] & objects[:, : control.shape[1]]).any()


# ---------------------------------------------------------------------------------- B2
@pytest.fixture(scope="module")
def internvl_answering_floats():
    """toy-internvl whose every answer is a box written as [0, 1] floats (over 12-56% x 30-80%)."""
    model = HookedVLM.from_pretrained("toy-internvl")
    answer = model.tokenizer("[[0.12, 0.30, 0.56, 0.80]]", add_special_tokens=False).input_ids
    model.generate = lambda inputs, **kwargs: torch.tensor([answer] * inputs.input_ids.shape[0])
    return model


def _float_box_sample() -> Sample:
    return Sample("f", Image.new("RGB", (100, 100)), "cat", (12, 30, 56, 80), mask_fn=lambda: np.ones((100, 100), bool),
                  choices=("cat",))  # fmt: skip


def test_evaluate_reads_internvl_float_boxes_as_fractions_and_counts_them(internvl_answering_floats):
    results = evaluate(internvl_answering_floats, [_float_box_sample()], "localization", progress=False)
    assert results["iou"].iloc[0] == pytest.approx(1.0) and results["float_box"].iloc[0] == True  # noqa: E712
    assert summarize(results)["n_float_boxes"].iloc[0] == 1


def test_evaluate_reads_float_boxes_in_thousandths_when_asked(internvl_answering_floats):
    results = evaluate(internvl_answering_floats, [_float_box_sample()], "localization", float_boxes="thousandths",
                       progress=False)  # fmt: skip
    assert results["iou"].iloc[0] < 1e-3 and results["float_box"].iloc[0] == True  # noqa: E712  written so, read otherwise
    assert summarize(results)["n_float_boxes"].iloc[0] == 1


def test_the_float_box_reading_is_recorded_in_the_run_manifest(internvl_answering_floats, tmp_path):
    import json

    evaluate(internvl_answering_floats, [_float_box_sample()], "localization", float_boxes="thousandths", progress=False,
             run=tmp_path / "evaluate")  # fmt: skip
    token_shuffle(internvl_answering_floats, [_float_box_sample()], modes=["full"], seeds=[0], float_boxes="thousandths",
                  progress=False, run=tmp_path / "shuffle")  # fmt: skip
    for name in ("evaluate", "shuffle"):
        manifest = json.loads((tmp_path / name / MANIFEST).read_text())
        assert manifest["settings"]["box_format"]["float_boxes"] == "thousandths"


def test_head_mediation_judges_an_internvl_float_answer_by_the_official_rule(internvl_answering_floats):
    """The source's greedy answer is the CMA target when it is correct: read as fractions it is."""
    sample = replace(_float_box_sample(), removed_image=Image.new("RGB", (100, 100), "white"))
    official = head_mediation(internvl_answering_floats, [sample], method="attribution", progress=False)
    thousandths = head_mediation(internvl_answering_floats, [sample], method="attribution", float_boxes="thousandths",
                                 progress=False)  # fmt: skip
    assert set(official["target_source"]) == {"src_greedy"} and set(thousandths["target_source"]) == {"gt"}


def test_the_float_box_reading_is_a_command_line_option_of_every_scoring_command():
    for command in ("evaluate", "token-ablation", "token-shuffle", "object-extension", "attention-knockout",
                    "head-mediation", "cumulative-head-ablation"):  # fmt: skip
        args = parser().parse_args([command, "--model", "m", "--out", "o"])
        assert args.float_boxes == inspect.signature(evaluate).parameters["float_boxes"].default == "official"
        args = parser().parse_args([command, "--model", "m", "--out", "o", "--float-boxes", "thousandths"])
        assert args.float_boxes == "thousandths"


def test_llava_refuses_the_thousandths_reading():
    from hooked_vlm.experiments import box_format

    llava = SimpleNamespace(cfg=SimpleNamespace(family="llava"), preprocessing=SimpleNamespace(image_mode="pad", image_size=336))
    assert "float_boxes" not in box_format(llava)
    with pytest.raises(ValueError, match="LLaVA writes fractions"):
        box_format(llava, float_boxes="thousandths")


# ---------------------------------------------------------------------------------- B5
def _scored_box_tokens(model, token_filter: str) -> list[str]:
    inputs = model.prepare(Image.new("RGB", (64, 64)), "Where is the cat?", answers="[0.61, 0.36, 0.92, 0.83]")
    kept = scored_tokens(inputs, model.tokenizer, token_filter)
    return [model.tokenizer.decode([i]) for i in inputs.input_ids[kept].tolist()]


def test_the_significant_digit_filter_drops_llavas_leading_zeros():
    model = HookedVLM.from_pretrained("toy-llava")
    assert _scored_box_tokens(model, "significant_digits") == list("61369283")


def test_the_cma_score_keeps_every_digit_by_default():
    model = HookedVLM.from_pretrained("toy-llava")
    assert inspect.signature(head_mediation).parameters["token_filter"].default == "digits"
    assert _scored_box_tokens(model, "digits") == list("061036092083")


def test_the_significant_digit_filter_keeps_internvls_integer_zeros():
    model = HookedVLM.from_pretrained("toy-internvl")
    inputs = model.prepare(Image.new("RGB", (64, 64)), "Where?", answers="<ref>cat</ref><box>[[120, 0, 305, 1000]]</box>")
    digits, significant = (scored_tokens(inputs, model.tokenizer, f) for f in ("digits", "significant_digits"))
    assert torch.equal(digits, significant) and digits.sum() == 11


def test_head_mediation_scores_the_chosen_digits_and_records_the_filter(llava, tmp_path):
    import json

    from hooked_vlm.experiments.head_mediation import pair_prompt
    from hooked_vlm.metrics import masked_nll

    sample = next(iter(as_samples(SyntheticLocalization(1, seed=0, image_sizes=((56, 56),)))))
    results = head_mediation(llava, [sample], target="gt", method="attribution", token_filter="significant_digits",
                             progress=False, run=tmp_path)  # fmt: skip
    base = llava.prepare(sample.removed_image, pair_prompt(sample, "localization"), answers=results["target"].iloc[0])
    for token_filter, same in (("significant_digits", True), ("digits", False)):
        p_base = float(masked_nll(llava, base, token_filter=token_filter).exp())
        assert (float(results["p_base"].iloc[0]) == pytest.approx(p_base, rel=1e-5)) is same
    assert json.loads((tmp_path / MANIFEST).read_text())["settings"]["token_filter"] == "significant_digits"
    with pytest.raises(ValueError, match="unknown token_filter"):
        head_mediation(llava, [sample], token_filter="zeros", progress=False)


def test_the_cma_token_filter_is_a_command_line_option_defaulting_to_the_function():
    for command in ("head-mediation", "cumulative-head-ablation"):
        assert parser().parse_args([command, "--model", "m", "--out", "o"]).token_filter == "digits"
        args = parser().parse_args([command, "--model", "m", "--out", "o", "--token-filter", "significant_digits"])
        assert args.token_filter == "significant_digits"
