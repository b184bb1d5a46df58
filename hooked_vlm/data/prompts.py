"""The paper's three task prompts and their target answers, for any dataset (§1.3).

- localization: ``Please provide the bounding box coordinates of the {class}.`` answered with a
  box in the family's own format (``hooked_vlm.boxes.format_box``);
- list classification: ``List all objects in the image. Choose only from {c1}, {c2}, ….``
  answered with the present classes, in the order the prompt lists them;
- binary classification: ``Is there a {class} in the image?`` answered ``Yes`` or ``No`` (the
  paper uses it only for causal mediation, because its answer is one decisive token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from hooked_vlm.boxes import LLAVA_HF_CROP_SIZE, Box, Family, FloatBoxes, Frame, ImageSize, format_box

LOCALIZATION_PROMPT = "Please provide the bounding box coordinates of the {class_name}."
LIST_PROMPT = "List all objects in the image. Choose only from {choices}."
BINARY_PROMPT = "Is there a {class_name} in the image?"
YES, NO = "Yes", "No"
# The list answer when none of the choices is present (e.g. a removed twin with no distractor).
NOTHING = "None"

FAMILIES: tuple[Family, ...] = ("llava", "internvl")

# Markup tags stay whole, letters group into words, digits stand alone, punctuation stands alone.
_WORD = re.compile(r"</?[a-z]+>|[A-Za-z]+|\d|[^\w\s]")


def localization_prompt(class_name: str) -> str:
    return LOCALIZATION_PROMPT.format(class_name=class_name)


def list_prompt(choices: Sequence[str]) -> str:
    return LIST_PROMPT.format(choices=", ".join(choices))


def binary_prompt(class_name: str) -> str:
    return BINARY_PROMPT.format(class_name=class_name)


def list_answer(present: Iterable[str], choices: Sequence[str]) -> str:
    """The present classes among ``choices``, in the prompt's order (a fixed target to train on)."""
    present = set(present)
    return ", ".join(c for c in choices if c in present) or NOTHING


def binary_answer(present: bool) -> str:
    return YES if present else NO


def localization_answer(box: Box, image_size: ImageSize, class_name: str, *,
                        family: Family, frame: Frame | None = None, crop_size: int = LLAVA_HF_CROP_SIZE,
                        float_boxes: FloatBoxes = "official") -> str:
    """The box as ``family`` writes it: LLaVA ``[x1, y1, x2, y2]`` in [0, 1] rounded to 2
    decimals, InternVL ``<ref>{class}</ref><box>[[x1, y1, x2, y2]]</box>`` on 0–1000.

    ``frame`` None is the family's default (``hooked_vlm.boxes.DEFAULT_FRAME``: LLaVA's padded
    square, InternVL's original image); ``crop_size`` fixes LLaVA's "crop" window (the
    checkpoint's image side, ``hooked_vlm.boxes.format_box``); ``float_boxes`` is parsing's, taken
    so that a whole ``experiments.box_format(model)`` can be passed.
    """
    return format_box(box, image_size, family=family, frame=frame, label=class_name, crop_size=crop_size,
                      float_boxes=float_boxes)


def split_words(text: str) -> list[str]:
    """Split prompt or answer text into the pieces a toy word-level tokenizer would use."""
    return _WORD.findall(text)


def vocabulary(class_names: Iterable[str], families: Sequence[Family] = FAMILIES) -> tuple[str, ...]:
    """Every word, digit, punctuation mark and markup tag the prompts and answers can contain.

    Built by formatting the actual prompts and answers (not from a hand-kept list), so it stays
    in step with ``format_box``. Digits are listed one by one: any coordinate is spelled with them.
    """
    class_names = list(class_names)
    texts = [YES, NO, NOTHING, "0123456789", list_prompt(class_names)]
    for name in class_names:
        texts += [localization_prompt(name), binary_prompt(name)]
        texts += [localization_answer((1, 2, 3, 4), (10, 10), name, family=f) for f in families]
    return tuple(sorted({w for t in texts for w in split_words(t)}))
