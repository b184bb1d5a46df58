"""The paper's metrics: localization score, classification accuracy, yes/no answers.

Localization (PAPER_PROTOCOL §1.3): parse the predicted box, compute its IoU with the ground
truth, take the success rate at IoU > 0.5, 0.7 and 0.9, and report the mean of the three rates.
Because the mean over items commutes with the mean over thresholds, the per-item score
`localization_score` (0, 1/3, 2/3 or 1) averages to the paper's number.

Classification: correct when the ground-truth class name appears in the answer (§1.3).

Results tables are pandas DataFrames with one row per item; the columns each summary reads are
listed in its docstring. Summaries return fractions in [0, 1]; the paper prints percentages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from hooked_vlm.boxes import LLAVA_HF_CROP_SIZE, Box, Family, FloatBoxes, Frame, ImageSize, iou, parsed_boxes

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.9)


# --- localization --------------------------------------------------------------------------


def is_hit(iou_value: float | None, threshold: float) -> bool:
    """IoU strictly above the threshold; a missing IoU (None or NaN: failed parse) is a miss.

    Strict `>` follows the paper's wording ("IoU > 0.5"); InternVL's own RefCOCO evaluator uses
    `>=`. The two differ only on exact ties, which integer-pixel boxes can produce.
    """
    if iou_value is None or math.isnan(iou_value):
        return False
    return iou_value > threshold


def localization_success(
    pred_box: Box | None,
    gt_box: Box,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[float, bool]:
    """Hit or miss at each IoU threshold, e.g. `{0.5: True, 0.7: True, 0.9: False}`.

    A prediction that could not be parsed (`None`) misses at every threshold.
    """
    value = None if pred_box is None else iou(pred_box, gt_box)
    return {t: is_hit(value, t) for t in thresholds}


def localization_score(
    pred_box: Box | None,
    gt_box: Box,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> float:
    """One item's share of the paper's score: the fraction of thresholds it passes."""
    hits = localization_success(pred_box, gt_box, thresholds)
    return sum(hits.values()) / len(hits)


def score_localization_answer(
    text: str,
    gt_box: Box,
    image_size: ImageSize,
    *,
    family: Family,
    frame: Frame | None = None,
    crop_size: int = LLAVA_HF_CROP_SIZE,
    float_boxes: FloatBoxes = "official",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, object]:
    """Parse a model's answer and score it: one results-table row for `summarize_localization`.

    Keys: `pred_box` (first parsed box or None), `n_boxes` (how many were parsed; the paper's
    protocol takes the first, §4), `iou` (NaN when nothing parsed), `hit@{t}` for each threshold,
    and `loc_score`; for InternVL also `float_box` (the first box was written as [0, 1] floats,
    see `boxes.parse_boxes`; None when nothing parsed). `family`, `frame`, `crop_size` and
    `float_boxes` are `parse_boxes`'s (for a model: `experiments.box_format(model)`).
    """
    boxes = parsed_boxes(text, image_size, family=family, frame=frame, crop_size=crop_size, float_boxes=float_boxes)
    pred = boxes[0].box if boxes else None
    value = float("nan") if pred is None else iou(pred, gt_box)
    row: dict[str, object] = {"pred_box": pred, "n_boxes": len(boxes), "iou": value}
    for t in thresholds:
        row[hit_column(t)] = is_hit(value, t)
    row["loc_score"] = localization_score(pred, gt_box, thresholds)
    if family == "internvl":
        row["float_box"] = boxes[0].float_box if boxes else None
    return row


def hit_column(threshold: float) -> str:
    """Column name of the hit flag at `threshold`, e.g. `hit@0.5`."""
    return f"hit@{threshold:g}"


def summarize_localization(
    results: pd.DataFrame,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    by: str | list[str] | None = None,
) -> pd.DataFrame:
    """The paper's localization numbers from a per-item results table.

    Reads column `iou` (float, NaN for an unparsed answer, which counts as a miss). Returns one
    row (or one per group of `by`) with `n`, `parsed` (fraction with a box), `success@{t}` for
    each threshold and `loc_score`, their mean: the paper's localization score.
    """
    return _summarize(results, lambda frame: _localization_numbers(frame, thresholds), by)


def _localization_numbers(results: pd.DataFrame, thresholds: Sequence[float]) -> dict[str, float]:
    values = results["iou"].to_numpy(dtype=np.float64)
    rates = {f"success@{t:g}": float(np.mean(np.nan_to_num(values, nan=-1.0) > t)) for t in thresholds}
    return {
        "n": len(values),
        "parsed": float(np.mean(~np.isnan(values))),
        **rates,
        "loc_score": float(np.mean(list(rates.values()))),
    }


def mean_localization_score(results: pd.DataFrame, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """The paper's localization score of a results table with an `iou` column (see above)."""
    return _localization_numbers(results, thresholds)["loc_score"]


# --- classification ------------------------------------------------------------------------

# Plurals that adding -s/-es does not produce. COCO's own names (PAPER_PROTOCOL §1.3 prompts
# with them) need only "person" and "mouse"; the rest keep synonyms and corrections honest.
_IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "wolf": "wolves",
}


Match = Literal["word", "substring"]
MATCHES: tuple[str, ...] = ("word", "substring")


def classification_correct(
    text: str,
    class_name: str,
    *,
    synonyms: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    match: Match = "word",
) -> bool:
    """Whether the answer names the class: the paper's "class name appears in the response".

    Matching is case-insensitive and on whole words, so "cat" is not found in "category" (the
    paper's plain substring test would find "car" in "carrot"); the last word may be plural
    ("cats", "buses", "people"), and words of a multi-word name may be joined by spaces, hyphens
    or nothing ("hot dog", "hot-dog", "hotdog"). `synonyms` are extra names that also count.
    `exclude` lists longer names whose mentions must not count, e.g. "teddy bear" when scoring
    "bear" (off by default, as in the paper). Negations ("there is no cat") still count: the
    paper's rule has no notion of them.

    `match="substring"` is the paper's rule to the letter: the lower-cased name occurs anywhere
    in the lower-cased answer ("car" in "carrot" counts; "people" is not "person").
    """
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    if not isinstance(text, str):
        return False
    for name in exclude or ():
        text = _name_pattern(name).sub(" ", text)
    names = [class_name, *(synonyms or ())]
    if match == "substring":
        return any(name.lower() in text.lower() for name in names)
    return any(_name_pattern(name).search(text) for name in names)


def _name_pattern(name: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern for a (possibly multi-word) name and its plural."""
    words = name.lower().split()
    if not words:
        raise ValueError("class name must not be empty")
    head = r"[\s\-_]*".join(re.escape(w) for w in words[:-1])
    last = "|".join(re.escape(form) for form in _word_forms(words[-1]))
    joined = rf"{head}[\s\-_]*(?:{last})" if head else rf"(?:{last})"
    return re.compile(rf"(?<![a-z0-9]){joined}(?![a-z0-9])", re.IGNORECASE)


def _word_forms(word: str) -> list[str]:
    """A word and its plausible plurals (longest first so the regex prefers them)."""
    forms = {word, word + "s", word + "es"}
    if word in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[word])
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    return sorted(forms, key=len, reverse=True)


_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_WORD = re.compile(r"[a-z]+")


def binary_answer(text: str) -> bool | None:
    """Read a yes/no answer: True, False, or None when it says neither (or both).

    The first word decides when it is a yes or no word ("Yes, there is a cat." -> True, "No."
    -> False); otherwise the answer counts only if exactly one of "yes"/"no" occurs as a word
    ("There is no cat." -> False). "There is a cat." -> None: the binary prompt (§1.3) expects
    a yes/no token, and guessing would hide format failures.
    """
    if not isinstance(text, str):
        return None
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    said_yes, said_no = any(w in _YES for w in words), any(w in _NO for w in words)
    if said_yes != said_no:
        return said_yes
    return None


def summarize_classification(results: pd.DataFrame, *, by: str | list[str] | None = None) -> pd.DataFrame:
    """Classification accuracy from a per-item results table.

    Reads column `correct` (bool, e.g. from `classification_correct`). Returns `n` and
    `accuracy` per group of `by` (one row without `by`).
    """
    return _summarize(results, _classification_numbers, by)


def _classification_numbers(results: pd.DataFrame) -> dict[str, float]:
    correct = results["correct"].eq(True).to_numpy()  # a missing value (None, NaN) is not correct
    return {"n": len(correct), "accuracy": float(np.mean(correct)) if len(correct) else float("nan")}


def classification_accuracy(results: pd.DataFrame) -> float:
    """Fraction of rows whose `correct` column is true."""
    return _classification_numbers(results)["accuracy"]


def summarize_binary(results: pd.DataFrame, *, by: str | list[str] | None = None) -> pd.DataFrame:
    """Yes/no results: accuracy and the false-positive rate the paper reports (§1.3, 0.27-0.70).

    Reads `answer` (True/False/None from `binary_answer`; None counts as wrong) and `present`
    (bool: is the object in the image; False for object-removed images). Returns `n`,
    `answered` (fraction with a yes/no), `accuracy`, `yes_rate`, and `false_positive_rate`
    (fraction of "yes" among rows with `present == False`; NaN if there are none).
    """
    return _summarize(results, _binary_numbers, by)


def _binary_numbers(results: pd.DataFrame) -> dict[str, float]:
    answers = results["answer"].map(_as_optional_bool)
    present = results["present"].eq(True)
    said_yes = answers.map(lambda a: a is True)
    correct = [a is not None and a == p for a, p in zip(answers, present)]
    absent = ~present
    return {
        "n": len(results),
        "answered": float(answers.notna().mean()),
        "accuracy": float(np.mean(correct)) if len(correct) else float("nan"),
        "yes_rate": float(said_yes.mean()),
        "false_positive_rate": float(said_yes[absent].mean()) if absent.any() else float("nan"),
    }


def _as_optional_bool(value: object) -> bool | None:
    """True/False, or None for a missing answer (None or NaN, as pandas may store it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def _summarize(results: pd.DataFrame, numbers, by: str | list[str] | None) -> pd.DataFrame:
    """Apply `numbers(frame) -> dict` to the whole table or to each group of `by`."""
    if by is None:
        return pd.DataFrame([numbers(results)])
    rows = {key: numbers(group) for key, group in results.groupby(by, sort=True)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.names = [by] if isinstance(by, str) else list(by)
    return table
