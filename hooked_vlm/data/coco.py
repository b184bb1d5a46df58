"""COCO-style instance annotations filtered as in the paper, and object-removed image pairs.

PAPER_PROTOCOL §1.2: from COCO val (with the label corrections of Singh et al. 2024, which
ship as a COCO-format JSON: pass that file), keep an object when

- its image's shorter side is at least 200 px,
- it is the only instance of its category in the image,
- it covers between 0.4% and 60% of the image (both bounds kept).

The paper reports 6,403 annotations in 3,560 images after filtering.

Reading is cheap: image sizes come from the JSON, so no image is opened until you call
`CocoItem.load_image()`, and masks are rasterised (with pycocotools) only by `CocoItem.mask()`.

Object-removed (inpainted) images live in one directory and are named after the annotation
they remove: `{ann_id}.{ext}` or `{image_id}_{ann_id}.{ext}`, with ext png, jpg or jpeg.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool
from PIL import Image
from pycocotools import mask as mask_utils

from hooked_vlm.boxes import Box, ImageSize, clip_box

# Paper defaults (PAPER_PROTOCOL §1.2, supplement §6.1).
MIN_AREA_FRACTION = 0.004
MAX_AREA_FRACTION = 0.60
MIN_SHORT_SIDE = 200

REMOVED_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_REMOVED_NAME = re.compile(r"^(?:(?P<image_id>\d+)_)?(?P<ann_id>[1-9]\d*)$")  # no leading zeros: COCO's image file names have them


@dataclass(frozen=True)
class CocoItem:
    """One queried object: an annotation of a category that occurs once in its image."""

    image_path: Path
    image_size: ImageSize  # (width, height), from the annotation file
    class_name: str
    category_id: int
    annotation_id: int
    image_id: int
    box: Box  # xyxy pixels, converted from COCO's xywh and clipped to the image
    area: float  # the annotation's `area` field: mask pixels
    segmentation: Any = field(repr=False, compare=False)  # polygons or RLE, as in the JSON

    def mask(self) -> Bool[np.ndarray, "height width"]:
        """The object's boolean mask, rasterised by pycocotools on each call (not cached, so a
        full dataset never holds thousands of masks)."""
        return segmentation_to_mask(self.segmentation, self.image_size)

    def load_image(self) -> Image.Image:
        """The image as RGB. Its size must be the annotation file's: box and mask are in those
        pixels (a resized copy would be scored against a box of another scale)."""
        with Image.open(self.image_path) as image:
            _check_size(self.image_path, image.size, self.image_size, "the annotation file says",
                        ": box and mask are in the annotation's pixels (a resized copy?)")  # fmt: skip
            return image.convert("RGB")


@dataclass
class FilterReport:
    """How many annotations each filter dropped, applied in this order, and what remains.

    Counts are sequential: each filter sees only what the previous ones kept.
    """

    n_annotations: int = 0
    n_images: int = 0
    dropped_crowd: int = 0
    dropped_small_image: int = 0
    dropped_not_unique: int = 0
    dropped_area_too_small: int = 0
    dropped_area_too_large: int = 0
    kept_annotations: int = 0
    kept_images: int = 0


@dataclass
class CocoSubset(Sequence[CocoItem]):
    """The filtered items, the filter report, and the category names (id -> name)."""

    items: list[CocoItem]
    report: FilterReport
    categories: dict[int, str]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        return self.items[index]

    def __iter__(self) -> Iterator[CocoItem]:
        return iter(self.items)

    @property
    def class_names(self) -> list[str]:
        """All category names in id order (the list the classification prompt offers)."""
        return [self.categories[i] for i in sorted(self.categories)]


def load_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    min_area: float = MIN_AREA_FRACTION,
    max_area: float = MAX_AREA_FRACTION,
    min_short_side: int = MIN_SHORT_SIDE,
    unique_category: bool = True,
    include_crowd: bool = False,
) -> CocoSubset:
    """Read a COCO instance-annotation JSON and keep the objects the paper queries.

    Filters (paper defaults; pass `min_area=0, max_area=1, min_short_side=0,
    unique_category=False, include_crowd=True` to keep everything), in this order:

    1. `include_crowd=False`: crowd annotations (a group of objects, `iscrowd=1`) are not items.
    2. image shorter side >= `min_short_side`.
    3. `unique_category`: exactly one instance of the category in the image. Every annotation of
       the category counts, whatever its size, and a crowd annotation counts as several
       instances, so an image with "people" as a crowd never yields a "person" item.
    4. `min_area <= area / (W * H) <= max_area`, with the annotation's mask `area` (the paper
       says the object "covers" that share of the image, so the mask, not the box).
    """
    data = json.loads(Path(annotation_file).read_text())
    images = {image["id"]: image for image in data["images"]}
    categories = {c["id"]: c["name"] for c in data["categories"]}
    instances = _instance_counts(data["annotations"])
    report = FilterReport(n_annotations=len(data["annotations"]), n_images=len(images))
    items = []
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        reason = _drop_reason(
            ann, image, instances, min_area, max_area, min_short_side, unique_category, include_crowd
        )
        if reason is not None:
            setattr(report, reason, getattr(report, reason) + 1)
            continue
        items.append(_make_item(ann, image, categories, Path(image_dir)))
    report.kept_annotations = len(items)
    report.kept_images = len({item.image_id for item in items})
    return CocoSubset(items=items, report=report, categories=categories)


def _instance_counts(annotations: list[dict]) -> Counter[tuple[int, int]]:
    """Instances per (image, category); a crowd annotation counts as two (i.e. "several")."""
    counts: Counter[tuple[int, int]] = Counter()
    for ann in annotations:
        counts[ann["image_id"], ann["category_id"]] += 2 if ann.get("iscrowd", 0) else 1
    return counts


def _drop_reason(
    ann: dict,
    image: dict,
    instances: Counter[tuple[int, int]],
    min_area: float,
    max_area: float,
    min_short_side: int,
    unique_category: bool,
    include_crowd: bool,
) -> str | None:
    """The `FilterReport` field of the first filter that drops `ann`, or None to keep it."""
    if ann.get("iscrowd", 0) and not include_crowd:
        return "dropped_crowd"
    if min(image["width"], image["height"]) < min_short_side:
        return "dropped_small_image"
    if unique_category and instances[ann["image_id"], ann["category_id"]] != 1:
        return "dropped_not_unique"
    fraction = ann["area"] / (image["width"] * image["height"])
    if fraction < min_area:
        return "dropped_area_too_small"
    if fraction > max_area:
        return "dropped_area_too_large"
    return None


def _make_item(ann: dict, image: dict, categories: dict[int, str], image_dir: Path) -> CocoItem:
    size = (int(image["width"]), int(image["height"]))
    x, y, w, h = ann["bbox"]
    return CocoItem(
        image_path=image_dir / image["file_name"],
        image_size=size,
        class_name=categories[ann["category_id"]],
        category_id=int(ann["category_id"]),
        annotation_id=int(ann["id"]),
        image_id=int(ann["image_id"]),
        # COCO boxes are xywh; a few overshoot the image border by rounding, hence the clip.
        box=clip_box((x, y, x + w, y + h), size),
        area=float(ann["area"]),
        segmentation=ann["segmentation"],
    )


def segmentation_to_mask(segmentation: Any, image_size: ImageSize) -> Bool[np.ndarray, "height width"]:
    """Rasterise a COCO segmentation (polygon list, uncompressed or compressed RLE) to a mask.

    Uses pycocotools exactly as COCO's own `annToRLE`, so masks match the official tools.
    """
    width, height = image_size
    if isinstance(segmentation, list):  # polygons: one flat [x0, y0, x1, y1, ...] list each
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowd annotations)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


# --- object-removed pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRemovedPair:
    """An item and its object-removed image (PAPER_PROTOCOL §1.2, §1.9).

    In causal mediation the original image is the *source* run (object present) and the
    removed image the *base* run (object absent).
    """

    item: CocoItem
    removed_image_path: Path

    @property
    def source_image_path(self) -> Path:
        return self.item.image_path

    @property
    def base_image_path(self) -> Path:
        return self.removed_image_path


def removed_image_paths(removed_dir: str | Path) -> dict[int, tuple[int | None, Path]]:
    """Map annotation id -> (image id if the name has one, path) for a removed-image directory.

    Images whose names do not follow the convention (e.g. `000000397133.png`, COCO's zero-padded
    image file name, a `_mask` file, a `.webp`) are skipped with a warning naming a few, other
    files silently; two files for the same annotation (e.g. `42.png` and `7_42.png`) raise
    ValueError.
    """
    found: dict[int, tuple[int | None, Path]] = {}
    skipped = []
    image_extensions = Image.registered_extensions()
    for path in sorted(Path(removed_dir).iterdir()):
        match = _REMOVED_NAME.match(path.stem)
        if path.suffix.lower() not in REMOVED_IMAGE_EXTENSIONS or match is None:
            if path.suffix.lower() in image_extensions:  # an image that will not be used; other files are no concern
                skipped.append(path.name)
            continue
        ann_id = int(match["ann_id"])
        if ann_id in found:
            raise ValueError(f"two object-removed images for annotation {ann_id}: {found[ann_id][1]}, {path}")
        image_id = int(match["image_id"]) if match["image_id"] else None
        found[ann_id] = (image_id, path)
    if skipped:
        warnings.warn(
            f"{len(skipped)} images in {removed_dir} are not named {{ann_id}}.{{png,jpg,jpeg}} or "
            f"{{image_id}}_{{ann_id}}.{{ext}} and were skipped: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}",
            stacklevel=2,
        )
    return found


class ObjectRemovedPairs(list):
    """`pair_with_removed`'s pairs, with the `class_names` of the dataset they came from (the
    classes the list-classification prompt offers, as for the `CocoSubset`)."""

    def __init__(self, pairs: Sequence[ObjectRemovedPair], class_names: Sequence[str]):
        super().__init__(pairs)
        self.class_names = list(class_names)


def pair_with_removed(
    items: Sequence[CocoItem],
    removed_dir: str | Path,
    *,
    require_all: bool = False,
) -> ObjectRemovedPairs:
    """Pair items with their object-removed images (items without one are skipped).

    A removed image is named after the annotation whose object it removes: `{ann_id}.{ext}` or
    `{image_id}_{ann_id}.{ext}`, ext png, jpg or jpeg (other images are skipped with a warning).
    The result is a list of `ObjectRemovedPair` carrying the dataset's `class_names` (those of
    a `CocoSubset`, else the items' own classes).

    Raises ValueError when a removed image's size differs from its original's (patching needs
    identical token layouts, §1.9; the original's is the annotation file's), when its name
    carries another image id than the item's, or, with `require_all`, when an item has no
    removed image. Only image headers are read.
    """
    available = removed_image_paths(removed_dir)
    class_names = getattr(items, "class_names", None) or sorted({item.class_name for item in items})
    pairs = []
    for item in items:
        if item.annotation_id not in available:
            if require_all:
                raise ValueError(f"annotation {item.annotation_id}: no object-removed image in {removed_dir}")
            continue
        image_id, path = available[item.annotation_id]
        if image_id is not None and image_id != item.image_id:
            raise ValueError(
                f"{path.name} names image {image_id}, "
                f"but annotation {item.annotation_id} is in image {item.image_id}"
            )
        _check_same_size(item, path)
        pairs.append(ObjectRemovedPair(item=item, removed_image_path=path))
    return ObjectRemovedPairs(pairs, class_names)


def _check_same_size(item: CocoItem, path: Path) -> None:
    """The removed image has its original's size (the annotation file's, which `load_image`
    holds the original to), so the pair lines up token for token."""
    with Image.open(path) as removed:  # the header only
        _check_size(path, removed.size, item.image_size, f"its original {item.image_path.name} is",
                    "; the pair must have identical sizes so the token layouts line up")  # fmt: skip


def _check_size(path: Path, size: tuple[int, int], expected: ImageSize, what: str, why: str = "") -> None:
    if tuple(size) != tuple(expected):
        raise ValueError(f"{path} is {size[0]}x{size[1]} but {what} {expected[0]}x{expected[1]}{why}")
