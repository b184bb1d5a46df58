"""Bounding boxes as the two model families write them, and IoU.

A box is `(x1, y1, x2, y2)` in pixels of the *original* image (continuous coordinates: the
image spans `[0, W] x [0, H]`), and an image size is `(width, height)`, as PIL reports it.

Each family writes boxes relative to some rectangle of the original image (PAPER_PROTOCOL §4,
ARCHITECTURES pitfall 13). We call that rectangle the model's *frame* and describe it by a
`FrameWindow`: the unit square `[0, 1]^2` the model writes in maps onto that window.

| family   | frame      | window in original pixels                     | text                              |
|----------|------------|-----------------------------------------------|-----------------------------------|
| llava    | "padded"   | mean-colour padded square, side max(W, H)     | `[0.61, 0.36, 0.92, 0.83]`        |
| llava    | "original" | the image itself                              | same                              |
| llava    | "crop"     | the llava-hf centre crop (see `frame_window`) | same                              |
| internvl | "original" | the image itself, integers on a 0-1000 scale  | `<ref>cat</ref><box>[[…]]</box>`  |

InternVL sometimes writes its box as [0, 1] floats instead (`[[0.12, 0.30, 0.56, 0.80]]`); by
default such a box is read as fractions of the image, as InternVL's own evaluator reads it
(`float_boxes`, see `parse_boxes`).

The "crop" window depends on the checkpoint's image side (`crop_size`: 336 for LLaVA-1.5, the
default; pass `model.preprocessing.image_size` for any other, as `experiments.box_format` does).

Parsing never raises on model output: anything that is not a well-formed box is dropped, and
`parse_box` returns `None`. Errors are raised only for bad *programmer* input (unknown family,
non-positive image size, a box outside the image given to `format_box`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import numpy as np
from jaxtyping import Float

Box = tuple[float, float, float, float]
ImageSize = tuple[int, int]  # (width, height)
Family = Literal["llava", "internvl"]
Frame = Literal["padded", "original", "crop"]

# Each family's default frame. LLaVA-1.5 was trained on `expand2square` images
# (image_aspect_ratio="pad"), and the paper says images are padded (PAPER_PROTOCOL §1.1), so the
# padded square is the default; §1.11.1 recommends checking "original" on a calibration split.
# InternVL always writes on its 0-1000 scale over the original image (pitfall 13).
DEFAULT_FRAME: dict[str, Frame] = {"llava": "padded", "internvl": "original"}

# Coordinate scale of the text: LLaVA writes fractions, InternVL thousandths.
_SCALE: dict[str, float] = {"llava": 1.0, "internvl": 1000.0}

# How an InternVL box whose numbers look like [0, 1] floats is read (see `parse_boxes`):
# "official" as fractions of the image, like InternVL's RefCOCO evaluator; "thousandths" on the
# 0-1000 scale like every other InternVL box.
FloatBoxes = Literal["official", "thousandths"]
FLOAT_BOXES: tuple[str, ...] = get_args(FloatBoxes)
# InternVL's evaluator divides a predicted box by 1000 only when its four numbers sum to >= 4;
# below that they are already fractions (OpenGVLab/InternVL,
# internvl_chat/eval/refcoco/evaluate_grounding.py:197-198 at 2410d1d:
# `if predict_bbox.sum() >= 4: predict_bbox = predict_bbox / 1000`).
FLOAT_BOX_SUM = 4.0

# llava-hf CLIPImageProcessor: resize the short side to 336, then centre-crop 336x336
# (ARCHITECTURES §1.5).
LLAVA_HF_SHORTEST_EDGE = 336
LLAVA_HF_CROP_SIZE = 336

# A parsed coordinate may overshoot the unit square by this fraction of the scale (e.g. -0.02 or
# 1.03 for LLaVA, 1030 for InternVL) and is then clipped; anything further out means the model
# did not write in this format (e.g. LLaVA answering in pixels), and the box is rejected. The
# paper is silent; TRI-ML's harness rejects anything outside [0, 1], which we relax slightly.
PARSE_SLACK = 0.05


# --- frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameWindow:
    """The rectangle of original-image pixels onto which a model's unit square maps.

    It may extend beyond the image (the padded square does) or cover only part of it (the
    centre crop does).
    """

    left: float
    top: float
    width: float
    height: float

    def to_unit(self, box: Box) -> Box:
        """Original-image pixels -> fractions of this window."""
        x1, y1, x2, y2 = box
        return (
            (x1 - self.left) / self.width,
            (y1 - self.top) / self.height,
            (x2 - self.left) / self.width,
            (y2 - self.top) / self.height,
        )

    def from_unit(self, box: Box) -> Box:
        """Fractions of this window -> original-image pixels (not clipped to the image)."""
        x1, y1, x2, y2 = box
        return (
            self.left + x1 * self.width,
            self.top + y1 * self.height,
            self.left + x2 * self.width,
            self.top + y2 * self.height,
        )


def frame_window(
    image_size: ImageSize,
    frame: Frame,
    *,
    shortest_edge: int = LLAVA_HF_SHORTEST_EDGE,
    crop_size: int = LLAVA_HF_CROP_SIZE,
) -> FrameWindow:
    """The window of the original image that a model writing in `frame` refers to.

    - "original": the image, `(0, 0, W, H)`.
    - "padded": original LLaVA-1.5's `expand2square`: a square of side S = max(W, H) with the
      image pasted at ((S - W) // 2, (S - H) // 2), so the window starts at minus that offset.
    - "crop": the llava-hf processor (ARCHITECTURES §1.5). It resizes the short side to
      `shortest_edge` and the long side to `int(shortest_edge * long / short)` (truncated), then
      centre-crops `crop_size` starting at `int((resized - crop_size) / 2)` on each axis. Mapped
      back through the per-axis resize factor `original / resized`, the crop covers, on the long
      axis, `[offset * long / long_resized, (offset + crop_size) * long / long_resized]`, and the
      whole short axis when `crop_size == shortest_edge`. Because `long_resized` is truncated
      this is not exactly a square of side `short` (640x427: 105.6 + 427.5 px, not 106.5 + 427).
    """
    width, height = _check_image_size(image_size)
    if frame == "original":
        return FrameWindow(0.0, 0.0, float(width), float(height))
    if frame == "padded":
        side = max(width, height)
        pad_left, pad_top = (side - width) // 2, (side - height) // 2  # expand2square's paste offset
        return FrameWindow(float(-pad_left), float(-pad_top), float(side), float(side))
    if frame == "crop":
        return _center_crop_window(width, height, shortest_edge, crop_size)
    raise ValueError(f"unknown frame {frame!r}; expected one of {get_args(Frame)}")


def _center_crop_window(width: int, height: int, shortest_edge: int, crop_size: int) -> FrameWindow:
    """The llava-hf resize-then-centre-crop window, in original pixels (see `frame_window`)."""
    # transformers' get_resize_output_image_size(default_to_square=False)
    if width <= height:
        new_width, new_height = shortest_edge, int(shortest_edge * height / width)
    else:
        new_width, new_height = int(shortest_edge * width / height), shortest_edge
    # transformers' center_crop: top = int((H - crop) / 2), left = int((W - crop) / 2)
    left, top = int((new_width - crop_size) / 2), int((new_height - crop_size) / 2)
    sx, sy = width / new_width, height / new_height
    return FrameWindow(left * sx, top * sy, crop_size * sx, crop_size * sy)


def box_to_frame(box: Box, image_size: ImageSize, frame: Frame, *, crop_size: int = LLAVA_HF_CROP_SIZE) -> Box:
    """Pixels of the original image -> fractions of `frame` (may fall outside [0, 1] for "crop")."""
    return _window(image_size, frame, crop_size).to_unit(box)


def box_from_frame(box: Box, image_size: ImageSize, frame: Frame, *, crop_size: int = LLAVA_HF_CROP_SIZE) -> Box:
    """Fractions of `frame` -> pixels of the original image, clipped to the image."""
    return clip_box(_window(image_size, frame, crop_size).from_unit(box), image_size)


def _window(image_size: ImageSize, frame: Frame, crop_size: int) -> FrameWindow:
    # a LLaVA checkpoint's processor resizes the short side to its image side and crops that
    # same side, so one number fixes the "crop" window
    return frame_window(image_size, frame, shortest_edge=crop_size, crop_size=crop_size)


def clip_box(box: Box, image_size: ImageSize) -> Box:
    """Clip a box to `[0, W] x [0, H]` (it may become empty)."""
    width, height = image_size
    x1, y1, x2, y2 = box
    return (_clip(x1, 0, width), _clip(y1, 0, height), _clip(x2, 0, width), _clip(y2, 0, height))


def _clip(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))


# --- formatting ----------------------------------------------------------------------------


def format_box(
    box: Box,
    image_size: ImageSize,
    *,
    family: Family,
    frame: Frame | None = None,
    label: str | None = None,
    crop_size: int = LLAVA_HF_CROP_SIZE,
    float_boxes: FloatBoxes = "official",
) -> str:
    """Render a ground-truth box exactly as `family` writes it (e.g. as a teacher-forced target).

    - llava: `[x1, y1, x2, y2]` as fractions of `frame`, each `round(v, 2)` printed as Python
      prints floats (`0.5`, not `0.50`), as TRI-ML's harness builds its targets; `label` is
      ignored because LLaVA writes none. With frame="crop", a box reaching outside the crop is
      clipped to it; one entirely outside raises (the model cannot see that object). Whether
      LLaVA's training data printed `0.5` or `0.50` was not checked; parsing accepts both. A box
      under 0.01 of the frame wide may round to x1 == x2, which `parse_box` then rejects.
      `crop_size`: the checkpoint's image side, which fixes the "crop" window (module docstring).
    - internvl: `<ref>{label}</ref><box>[[x1, y1, x2, y2]]</box>` with `int(x / W * 1000)`
      (InternVL issue #285); without `label`, only the `<box>…</box>` part.

    `float_boxes` concerns parsing only (`parse_boxes`); it is accepted (and checked) so that one
    `experiments.box_format(model)` serves both.

    Raises ValueError on an unknown family/frame, a non-positive image size, or a box that is
    not inside the image with x1 < x2 and y1 < y2.
    """
    check_box(box, image_size)
    frame = _resolve_frame(family, frame)
    check_float_boxes(family, float_boxes)
    if family == "internvl":
        return _format_internvl(box, image_size, label)
    return _format_llava(box, image_size, frame, crop_size)


def _format_llava(box: Box, image_size: ImageSize, frame: Frame, crop_size: int) -> str:
    unit = tuple(_clip(v, 0.0, 1.0) for v in box_to_frame(box, image_size, frame, crop_size=crop_size))
    if not (unit[0] < unit[2] and unit[1] < unit[3]):
        raise ValueError(f"box {box} lies outside the {frame!r} frame of an image of size {image_size}")
    # `+ 0.0` turns a rounded -0.0 into 0.0
    return "[" + ", ".join(repr(round(v, 2) + 0.0) for v in unit) + "]"


def _format_internvl(box: Box, image_size: ImageSize, label: str | None) -> str:
    width, height = image_size
    x1, y1, x2, y2 = box
    coords = [int(v * 1000) for v in (x1 / width, y1 / height, x2 / width, y2 / height)]
    text = f"<box>[[{', '.join(map(str, coords))}]]</box>"
    return text if label is None else f"<ref>{label}</ref>{text}"


# --- parsing -------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)"
# An innermost bracketed (or parenthesised) list: `[0.1, 0.2, 0.3, 0.4]`, the inner lists of
# `[[a, b, c, d], [e, f, g, h]]`, `(0.1, 0.2, 0.3, 0.4)`.
_BRACKETED = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_SEPARATOR = re.compile(r"[\s,;]+")
# A maximal run of comma-separated numbers outside brackets: `0.1, 0.2, 0.3, 0.4` (a full stop
# after the last number ends the sentence, not the number).
_COMMA_RUN = re.compile(rf"(?<![\w.]){_NUMBER}(?:\s*,\s*{_NUMBER})+(?!\w|\.\d)")
_IS_NUMBER = re.compile(rf"^{_NUMBER}$")


class ParsedBox(NamedTuple):
    """A box read from a model's answer: `box` in original-image pixels, and `float_box`, whether
    InternVL wrote it as [0, 1] floats (its four numbers sum to < 4, the official evaluator's
    test), however `float_boxes` then read it; always False for LLaVA, which writes fractions."""

    box: Box
    float_box: bool


def parsed_boxes(
    text: str,
    image_size: ImageSize,
    *,
    family: Family,
    frame: Frame | None = None,
    crop_size: int = LLAVA_HF_CROP_SIZE,
    float_boxes: FloatBoxes = "official",
) -> list[ParsedBox]:
    """`parse_boxes`, each box with how it was written (`ParsedBox`)."""
    width, height = _check_image_size(image_size)
    frame = _resolve_frame(family, frame)
    check_float_boxes(family, float_boxes)
    if not isinstance(text, str):
        return []
    window = _window((width, height), frame, crop_size)
    parsed = []
    for quad in _number_quads(text):
        float_box = family == "internvl" and sum(quad) < FLOAT_BOX_SUM
        scale = 1.0 if float_box and float_boxes == "official" else _SCALE[family]
        unit = _to_unit_box(quad, scale)
        if unit is None:
            continue
        box = clip_box(window.from_unit(unit), (width, height))
        if box[0] < box[2] and box[1] < box[3]:
            parsed.append(ParsedBox(box, float_box))
    return parsed


def parse_boxes(
    text: str,
    image_size: ImageSize,
    *,
    family: Family,
    frame: Frame | None = None,
    crop_size: int = LLAVA_HF_CROP_SIZE,
    float_boxes: FloatBoxes = "official",
) -> list[Box]:
    """Every well-formed box in a model's answer, in original-image pixels, clipped to the image.

    Accepted (PAPER_PROTOCOL §4): lists of exactly four numbers with or without brackets and
    spaces, several per answer, integers or floats; InternVL answers with `<ref>`/`<box>` tags,
    with the tags stripped (`cat[[1, 2, 3, 4]]`, what `skip_special_tokens=True` leaves), with
    missing opening or closing tags, and `[[…], […]]` with several boxes. Lists in brackets take
    precedence; a bare comma-separated run of four numbers is used only when there are none
    (this also recovers an answer cut off before its closing bracket).

    Dropped (never raised): lists not of length four; x1 >= x2 or y1 >= y2 (swapped or empty
    boxes are rejected, not reordered, following TRI-ML's harness); any coordinate more than
    `PARSE_SLACK` of the scale outside it (LLaVA pixel answers like `[120, 45, 300, 200]`,
    InternVL values above 1050); boxes that are empty once clipped to the image (e.g. a LLaVA box
    drawn entirely on the padding). Coordinates within the slack are clipped to the scale.
    `crop_size`: the checkpoint's image side, which fixes the "crop" window (see the module
    docstring).

    `float_boxes` (InternVL only): a box whose four numbers sum to < 4 (`FLOAT_BOX_SUM`) was
    written as [0, 1] floats; "official" reads it as fractions of the image, as InternVL's RefCOCO
    evaluator does (evaluate_grounding.py:197-198, above), "thousandths" on the 0-1000 scale like
    any other (`[[0.12, 0.30, 0.56, 0.80]]`: a sub-pixel box). The test is the evaluator's sum,
    not a decimal point: `[[0.5, 0.9, 1.2, 1.8]]` is read in thousandths, `[[0, 0, 1, 1]]` is the
    whole image. For LLaVA, which writes fractions, only "official" is allowed.
    """
    return [parsed.box for parsed in parsed_boxes(text, image_size, family=family, frame=frame, crop_size=crop_size,
                                                  float_boxes=float_boxes)]  # fmt: skip


def parse_box(
    text: str,
    image_size: ImageSize,
    *,
    family: Family,
    frame: Frame | None = None,
    crop_size: int = LLAVA_HF_CROP_SIZE,
    float_boxes: FloatBoxes = "official",
) -> Box | None:
    """The first box of `parse_boxes`, or None when the answer holds no well-formed box.

    Taking the first of several boxes follows PAPER_PROTOCOL §4 (log how often there were more
    with `len(parse_boxes(...))`).
    """
    boxes = parse_boxes(text, image_size, family=family, frame=frame, crop_size=crop_size, float_boxes=float_boxes)
    return boxes[0] if boxes else None


def _number_quads(text: str) -> list[tuple[float, float, float, float]]:
    """Lists of exactly four numbers, bracketed ones first, else bare comma-separated runs."""
    bracketed = [_as_quad(_SEPARATOR.split(m.group(1))) for m in _BRACKETED.finditer(text)]
    quads = [q for q in bracketed if q is not None]
    if quads:
        return quads
    runs = [_as_quad(re.split(r"\s*,\s*", m.group(0))) for m in _COMMA_RUN.finditer(text)]
    return [q for q in runs if q is not None]


def _as_quad(tokens: list[str]) -> tuple[float, float, float, float] | None:
    tokens = [t for t in tokens if t]  # separators at either end leave empty strings
    if len(tokens) != 4 or not all(_IS_NUMBER.match(t) for t in tokens):
        return None
    x1, y1, x2, y2 = (float(t) for t in tokens)
    return x1, y1, x2, y2


def _to_unit_box(quad: tuple[float, float, float, float], scale: float) -> Box | None:
    """Scale a parsed quad to [0, 1], or None if it is not a box in this format."""
    x1, y1, x2, y2 = (v / scale for v in quad)
    if not (x1 < x2 and y1 < y2):
        return None
    if any(v < -PARSE_SLACK or v > 1.0 + PARSE_SLACK for v in (x1, y1, x2, y2)):
        return None
    return _clip(x1, 0, 1), _clip(y1, 0, 1), _clip(x2, 0, 1), _clip(y2, 0, 1)


# --- IoU -----------------------------------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes; 0.0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = ix * iy
    union = _area(a) + _area(b) - intersection
    return float(intersection / union) if union > 0 else 0.0


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou_array(
    a: Float[np.ndarray, "*batch 4"], b: Float[np.ndarray, "*batch 4"]
) -> Float[np.ndarray, "*batch"]:
    """Element-wise IoU of broadcastable arrays of xyxy boxes.

    For all pairs use `iou_array(a[:, None], b[None])` -> `[n, m]`. A NaN row (a missing
    prediction) gives NaN, which the scoring functions count as a miss; an empty union gives 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = ix * iy
    union = _area_array(a) + _area_array(b) - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, np.where(np.isnan(union), np.nan, 0.0))


def _area_array(boxes: Float[np.ndarray, "*batch 4"]) -> Float[np.ndarray, "*batch"]:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


# --- argument checks (programmer errors) ---------------------------------------------------


def _check_image_size(image_size: ImageSize) -> ImageSize:
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive (width, height), got {image_size}")
    return width, height


def check_box(box: Box, image_size: ImageSize) -> None:
    """Raise ValueError unless `box` is (x1, y1, x2, y2) inside the image with x1 < x2, y1 < y2."""
    width, height = _check_image_size(image_size)
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2), got {box}")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box {box} must have x1 < x2 and y1 < y2")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"box {box} lies outside the image of size (width, height) = {image_size}")


def check_float_boxes(family: Family, float_boxes: FloatBoxes) -> None:
    """Raise ValueError unless `float_boxes` is known, and "official" for LLaVA (see `parse_boxes`)."""
    if float_boxes not in FLOAT_BOXES:
        raise ValueError(f"unknown float_boxes {float_boxes!r}; expected one of {FLOAT_BOXES}")
    if family == "llava" and float_boxes != "official":
        # LLaVA writes [0, 1] fractions by design: there is no 0-1000 scale to read them on
        raise ValueError(f"float_boxes={float_boxes!r} concerns InternVL's 0-1000 scale; LLaVA writes fractions")


def _resolve_frame(family: Family, frame: Frame | None) -> Frame:
    if family not in _SCALE:
        raise ValueError(f"unknown family {family!r}; expected one of {get_args(Family)}")
    if frame is None:
        return DEFAULT_FRAME[family]
    if frame not in get_args(Frame):
        raise ValueError(f"unknown frame {frame!r}; expected one of {get_args(Frame)}")
    if family == "internvl" and frame != "original":
        # InternVL's 0-1000 scale is always over the original image; tiles never matter.
        raise ValueError(f"InternVL writes boxes in the 'original' frame only, got frame={frame!r}")
    return frame
