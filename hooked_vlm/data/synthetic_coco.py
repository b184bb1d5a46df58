"""Write synthetic items in the COCO layout, so they flow through the same reader as COCO val.

Layout under ``out_dir`` (the names mirror COCO's own ``val2017/`` + ``annotations/``):

    images/{image_id:012d}.png           the scenes (image_id = item index + 1)
    annotations/instances.json           COCO instances: images, annotations, categories
    removed/{annotation_id}.png          object-removed twin of each annotated target

Every object of a scene is annotated (so "exactly one instance of the queried category" can be
checked as on COCO); the item's target carries ``"is_target": true``. Segmentations are COCO
compressed RLE, which is exact (polygons would round the masks). ``removed_for="all"`` also
writes a removed twin for every distractor, which turns each object into a usable target.

Reading back with ``hooked_vlm.data.coco`` (its removed-image convention is ``{ann_id}.png``);
the paper's size filters are meant for COCO photos, so switch them off for small renders:

    path = SyntheticLocalization(500, seed=0).export_coco(out)
    subset = load_coco(path, out / "images", min_area=0, max_area=1, min_short_side=0)
    pairs = pair_with_removed(subset, out / "removed")   # one (image, removed twin) per target
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from hooked_vlm.data.synthetic import SceneObject, SyntheticItem, SyntheticLocalization

IMAGES_DIR = "images"
ANNOTATION_FILE = "annotations/instances.json"
REMOVED_DIR = "removed"


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a boolean (H, W) mask, with ``counts`` as str for JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _image_record(item: SyntheticItem, image_id: int) -> dict:
    width, height = item.image_size
    return {"id": image_id, "file_name": f"{image_id:012d}.png", "width": width, "height": height,
            "synthetic": {"seed": item.seed, "split": item.split, "index": item.index}}


def _annotation_record(obj: SceneObject, ann_id: int, image_id: int, category_id: int,
                       is_target: bool) -> dict:
    x1, y1, x2, y2 = obj.box
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(obj.mask.sum()), "iscrowd": 0,
            "segmentation": encode_rle(obj.mask), "is_target": is_target}


def export_coco(dataset: SyntheticLocalization, out_dir: str | Path, *,
                indices: Iterable[int] | None = None, removed_for: str = "target") -> Path:
    """Write ``dataset`` (or the items at ``indices``) under ``out_dir``; returns the JSON path.

    ``removed_for``: "target" writes the removed twin of each item's target only; "all" writes
    one for every object. Categories are all of the dataset's classes, ids from 1 in
    ``dataset.classes`` order; the config, seed and split go in ``info`` so the export can be
    regenerated.
    """
    if removed_for not in ("target", "all"):
        raise ValueError(f"removed_for must be 'target' or 'all', got {removed_for!r}")
    out = Path(out_dir)
    for sub in (IMAGES_DIR, REMOVED_DIR, Path(ANNOTATION_FILE).parent):
        (out / sub).mkdir(parents=True, exist_ok=True)
    category_ids = {name: k + 1 for k, name in enumerate(dataset.classes)}
    images, annotations = [], []
    for index in range(len(dataset)) if indices is None else indices:
        item = dataset[index]
        image_id = item.index + 1
        record = _image_record(item, image_id)
        item.image.save(out / IMAGES_DIR / record["file_name"])
        images.append(record)
        for k, obj in enumerate(item.objects):
            ann_id = len(annotations) + 1
            annotations.append(_annotation_record(obj, ann_id, image_id,
                                                  category_ids[obj.class_name], k == 0))
            if k == 0 or removed_for == "all":
                twin = item.removed_image if k == 0 else item.render_without(k)
                twin.save(out / REMOVED_DIR / f"{ann_id}.png")
    categories = [{"id": i, "name": name, "supercategory": name.split(" ", 1)[1]}
                  for name, i in category_ids.items()]
    info = {"description": "hooked_vlm synthetic localization", "seed": dataset.seed,
            "split": dataset.split, "config": asdict(dataset.config)}
    path = out / ANNOTATION_FILE
    path.write_text(json.dumps({"info": info, "images": images, "annotations": annotations,
                                "categories": categories}))
    return path
