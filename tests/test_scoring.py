"""The paper's metrics (PAPER_PROTOCOL §1.3)."""

import math

import numpy as np
import pandas as pd
import pytest

from hooked_vlm.scoring import (
    binary_answer,
    classification_accuracy,
    classification_correct,
    localization_score,
    localization_success,
    mean_localization_score,
    score_localization_answer,
    summarize_binary,
    summarize_classification,
    summarize_localization,
)

GT = (0.0, 0.0, 10.0, 10.0)


def box_with_iou(value):
    """A box sharing GT's top-left corner whose IoU with GT is exactly `value` (nested, same height)."""
    return (0.0, 0.0, 10.0 * value, 10.0)


# --- localization --------------------------------------------------------------------------


def test_success_is_reported_per_threshold():
    assert localization_success(box_with_iou(0.8), GT) == {0.5: True, 0.7: True, 0.9: False}


def test_iou_equal_to_the_threshold_is_a_miss():
    # the paper says "IoU > 0.5": strictly greater
    assert localization_success(box_with_iou(0.5), GT)[0.5] is False


def test_iou_just_above_the_threshold_is_a_hit():
    assert localization_success(box_with_iou(0.5001), GT)[0.5] is True


def test_failed_parse_misses_every_threshold():
    assert localization_success(None, GT) == {0.5: False, 0.7: False, 0.9: False}


def test_score_is_the_fraction_of_thresholds_passed():
    assert localization_score(box_with_iou(0.8), GT) == pytest.approx(2 / 3)


def test_perfect_box_scores_one():
    assert localization_score(GT, GT) == 1.0


def test_failed_parse_scores_zero():
    assert localization_score(None, GT) == 0.0


def test_custom_thresholds():
    assert localization_success(box_with_iou(0.6), GT, thresholds=(0.5,)) == {0.5: True}


def test_answer_scoring_parses_the_first_box_and_counts_all():
    row = score_localization_answer(
        "[0.0, 0.0, 0.5, 1.0] [0.5, 0.0, 1.0, 1.0]", (0, 0, 50, 100), (100, 100), family="llava", frame="original"
    )
    assert row["pred_box"] == (0, 0, 50, 100)
    assert row["n_boxes"] == 2
    assert row["iou"] == 1.0
    assert row["loc_score"] == 1.0 and row["hit@0.9"] is True


def test_internvl_answer_scoring_says_whether_the_box_was_written_as_floats():
    floats = score_localization_answer("[[0.0, 0.0, 0.5, 1.0]]", (0, 0, 50, 100), (100, 100), family="internvl")
    assert floats["float_box"] is True and floats["iou"] == 1.0  # read as fractions, as InternVL's evaluator
    thousandths = score_localization_answer("[[0, 0, 500, 1000]]", (0, 0, 50, 100), (100, 100), family="internvl")
    assert thousandths["float_box"] is False and thousandths["iou"] == 1.0
    assert score_localization_answer("no box", (0, 0, 50, 100), (100, 100), family="internvl")["float_box"] is None
    assert "float_box" not in score_localization_answer("[0.0, 0.0, 0.5, 1.0]", (0, 0, 50, 100), (100, 100), family="llava")


def test_answer_scoring_of_garbage_is_a_miss_with_nan_iou():
    row = score_localization_answer("I don't know", (0, 0, 50, 100), (100, 100), family="internvl")
    assert row["pred_box"] is None and row["n_boxes"] == 0
    assert math.isnan(row["iou"])
    assert row["loc_score"] == 0.0 and row["hit@0.5"] is False


def test_mean_score_equals_mean_over_thresholds_of_success_rates():
    results = pd.DataFrame({"iou": [0.95, 0.75, 0.55, 0.2]})
    # success rates 3/4, 2/4, 1/4 -> mean 0.5
    assert mean_localization_score(results) == pytest.approx(0.5)


def test_summary_counts_nan_iou_as_miss_and_unparsed():
    summary = summarize_localization(pd.DataFrame({"iou": [0.95, np.nan]}))
    row = summary.iloc[0]
    assert row["n"] == 2
    assert row["parsed"] == 0.5
    assert row["success@0.5"] == 0.5 and row["success@0.9"] == 0.5
    assert row["loc_score"] == pytest.approx(0.5)


def test_summary_groups_by_a_column():
    results = pd.DataFrame({"iou": [1.0, 0.0, 0.6, 0.6], "condition": ["a", "a", "b", "b"]})
    summary = summarize_localization(results, by="condition")
    assert summary.loc["a", "loc_score"] == pytest.approx(0.5)
    assert summary.loc["b", "loc_score"] == pytest.approx(1 / 3)


def test_summary_matches_per_item_scores():
    ious = [0.3, 0.51, 0.71, 0.91, np.nan]
    per_item = [localization_score(box_with_iou(v), GT) if not math.isnan(v) else 0.0 for v in ious]
    assert mean_localization_score(pd.DataFrame({"iou": ious})) == pytest.approx(np.mean(per_item))


# --- classification ------------------------------------------------------------------------


def test_class_name_anywhere_in_the_answer_is_correct():
    assert classification_correct("I see a dog, a cat and a couch.", "cat")


def test_matching_ignores_case():
    assert classification_correct("Cat, Dog", "cat")


def test_class_name_inside_another_word_does_not_count():
    assert not classification_correct("This is a category of animals.", "cat")


def test_car_is_not_found_in_carrot():
    assert not classification_correct("carrot, broccoli", "car")


def test_regular_plural_counts():
    assert classification_correct("There are two cats.", "cat")


def test_es_plural_counts():
    assert classification_correct("buses and benches", "bus")


def test_irregular_plural_counts():
    assert classification_correct("Three people are walking.", "person")


def test_mice_count_as_mouse():
    assert classification_correct("mice", "mouse")


def test_multi_word_name_matches_with_space_hyphen_or_nothing():
    for text in ("a hot dog", "a hot-dog", "a hotdog", "Hot Dogs"):
        assert classification_correct(text, "hot dog"), text


def test_multi_word_name_needs_all_its_words():
    assert not classification_correct("a dog", "hot dog")


def test_synonym_counts():
    assert classification_correct("a sofa", "couch", synonyms=["sofa"])


def test_exclude_removes_longer_names_containing_the_class():
    assert classification_correct("a teddy bear", "bear")
    assert not classification_correct("a teddy bear", "bear", exclude=["teddy bear"])
    assert classification_correct("a teddy bear and a bear", "bear", exclude=["teddy bear"])


def test_negation_still_counts_as_in_the_paper():
    assert classification_correct("There is no cat.", "cat")


def test_non_string_answer_is_incorrect():
    assert not classification_correct(None, "cat")  # type: ignore[arg-type]


def test_accuracy_is_the_fraction_correct():
    results = pd.DataFrame({"correct": [True, False, True, True]})
    assert classification_accuracy(results) == 0.75
    assert summarize_classification(results).iloc[0]["accuracy"] == 0.75


def test_a_missing_correct_or_present_value_is_not_counted_as_true():
    assert summarize_classification(pd.DataFrame({"correct": [False, float("nan"), None]})).iloc[0]["accuracy"] == 0.0
    yes_no = pd.DataFrame({"answer": [True, True], "present": [True, float("nan")]})
    summary = summarize_binary(yes_no).iloc[0]
    assert summary["accuracy"] == 0.5 and summary["false_positive_rate"] == 1.0  # NaN present: not present


def test_classification_summary_groups_by_a_column():
    results = pd.DataFrame({"correct": [True, False, True, True], "model": ["a", "a", "b", "b"]})
    summary = summarize_classification(results, by="model")
    assert summary.loc["a", "accuracy"] == 0.5 and summary.loc["b", "accuracy"] == 1.0


# --- yes / no ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Yes", "yes.", "Yes, there is a cat in the image.", " YES"])
def test_yes_answers(text):
    assert binary_answer(text) is True


@pytest.mark.parametrize("text", ["No", "no.", "No, there is no cat.", "There is no cat in the image."])
def test_no_answers(text):
    assert binary_answer(text) is False


@pytest.mark.parametrize(
    "text", ["", "There is a cat.", "Maybe.", "Yesterday I saw nothing", "It could be yes or no."]
)
def test_unclear_answers_are_none(text):
    assert binary_answer(text) is None


def test_the_first_word_decides():
    assert binary_answer("Yes, but no dog.") is True


def test_binary_summary_reports_false_positive_rate_on_absent_objects():
    results = pd.DataFrame(
        {"answer": [True, True, False, True, None], "present": [True, True, True, False, False]}
    )
    row = summarize_binary(results).iloc[0]
    assert row["accuracy"] == pytest.approx(2 / 5)
    assert row["false_positive_rate"] == pytest.approx(1 / 2)
    assert row["answered"] == pytest.approx(4 / 5)
    assert row["yes_rate"] == pytest.approx(3 / 5)
