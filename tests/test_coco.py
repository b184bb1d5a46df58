"""COCO reading, the paper's filters (PAPER_PROTOCOL §1.2), masks, and object-removed pairs."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hooked_vlm.data.coco import (
    CocoItem,
    load_coco,
    pair_with_removed,
    removed_image_paths,
    segmentation_to_mask,
)

CATEGORIES = ["cat", "dog", "bird", "horse", "cow", "person", "sheep", "zebra"]


def rect(x, y, w, h):
    """A rectangle as a COCO polygon."""
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def polygon_annotation(ann_id, image_id, category, x, y, w, h):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORIES.index(category) + 1,
        "segmentation": rect(x, y, w, h),
        "area": w * h,
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def rle_annotation(ann_id, image_id, category, mask, *, crowd):
    """An RLE annotation: uncompressed (counts list) for crowds, as in COCO; compressed otherwise."""
    fortran = np.asfortranarray(mask.astype(np.uint8))
    if crowd:  # run lengths in column-major order, starting with a run of zeros
        flat = fortran.flatten(order="F")
        changes = np.flatnonzero(np.diff(flat)) + 1
        bounds = np.concatenate([[0], changes, [flat.size]])
        counts = np.diff(bounds).tolist()
        if flat[0]:
            counts = [0, *counts]
        segmentation = {"size": list(mask.shape), "counts": counts}
    else:
        encoded = mask_utils.encode(fortran)
        segmentation = {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORIES.index(category) + 1,
        "segmentation": segmentation,
        "area": float(mask.sum()),
        "bbox": box,
        "iscrowd": int(crowd),
    }


def block_mask(height, width, top, left, bottom, right):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def annotation_file(tmp_path):
    """Four images, each exercising filters; image areas are 400*300 = 120000 px unless noted.

    0.4% of 120000 is 480 px, 60% is 72000 px.
    """
    images = [
        {"id": 1, "file_name": "one.jpg", "width": 400, "height": 300},
        {"id": 2, "file_name": "two.jpg", "width": 400, "height": 300},
        {"id": 3, "file_name": "small.jpg", "width": 150, "height": 400},  # short side < 200
        {"id": 4, "file_name": "edge.jpg", "width": 200, "height": 250},  # short side == 200
    ]
    annotations = [
        polygon_annotation(101, 1, "cat", 10, 20, 40, 40),  # kept
        polygon_annotation(102, 1, "dog", 100, 100, 50, 50),  # two dogs: not unique
        polygon_annotation(103, 1, "dog", 200, 100, 50, 50),
        polygon_annotation(104, 1, "bird", 300, 10, 20, 24),  # 480 px = 0.4% exactly: kept
        polygon_annotation(105, 1, "sheep", 300, 100, 20, 23.95),  # 479 px: too small
        polygon_annotation(201, 2, "horse", 0, 0, 300, 240),  # 72000 px = 60% exactly: kept
        polygon_annotation(202, 2, "cow", 0, 0, 300, 240.01),  # 72003 px: too large
        rle_annotation(203, 2, "person", block_mask(300, 400, 250, 0, 300, 100), crowd=True),  # crowd
        polygon_annotation(204, 2, "person", 350, 10, 40, 40),  # a person next to a crowd: not unique
        polygon_annotation(301, 3, "cat", 10, 10, 50, 50),  # small image
        rle_annotation(401, 4, "zebra", block_mask(250, 200, 30, 20, 130, 90), crowd=False),  # kept
    ]
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def subset(annotation_file, tmp_path):
    return load_coco(annotation_file, tmp_path / "images")


def kept_ids(subset):
    return sorted(item.annotation_id for item in subset)


# --- filters -------------------------------------------------------------------------------


def test_paper_filters_keep_only_unique_mid_sized_objects_in_large_images(subset):
    assert kept_ids(subset) == [101, 104, 201, 401]


def test_report_counts_what_each_filter_dropped(subset):
    report = subset.report
    assert (report.n_annotations, report.n_images) == (11, 4)
    assert report.dropped_crowd == 1
    assert report.dropped_small_image == 1
    assert report.dropped_not_unique == 3
    assert report.dropped_area_too_small == 1
    assert report.dropped_area_too_large == 1
    assert (report.kept_annotations, report.kept_images) == (4, 3)


def test_area_exactly_at_the_lower_limit_is_kept(subset):
    assert 104 in kept_ids(subset)


def test_area_just_below_the_lower_limit_is_dropped(subset):
    assert 105 not in kept_ids(subset)


def test_area_exactly_at_the_upper_limit_is_kept(subset):
    assert 201 in kept_ids(subset)


def test_area_just_above_the_upper_limit_is_dropped(subset):
    assert 202 not in kept_ids(subset)


def test_image_with_short_side_below_200_is_dropped(subset):
    assert 301 not in kept_ids(subset)


def test_image_with_short_side_exactly_200_is_kept(subset):
    assert 401 in kept_ids(subset)


def test_category_with_two_instances_is_dropped(subset):
    assert not {102, 103} & set(kept_ids(subset))


def test_crowd_annotation_makes_its_category_not_unique(subset):
    assert 204 not in kept_ids(subset)


def test_filters_can_be_switched_off(annotation_file, tmp_path):
    everything = load_coco(
        annotation_file, tmp_path, min_area=0, max_area=1, min_short_side=0, unique_category=False, include_crowd=True
    )
    assert len(everything) == 11


def test_filter_thresholds_are_parameters(annotation_file, tmp_path):
    assert 105 in kept_ids(load_coco(annotation_file, tmp_path, min_area=0.003))


# --- items ---------------------------------------------------------------------------------


def test_item_fields_come_from_the_annotation_file(subset, tmp_path):
    cat = next(item for item in subset if item.annotation_id == 101)
    assert cat.image_path == tmp_path / "images" / "one.jpg"
    assert cat.image_size == (400, 300)
    assert (cat.class_name, cat.category_id, cat.image_id) == ("cat", 1, 1)


def test_item_box_is_xyxy_converted_from_coco_xywh(subset):
    cat = next(item for item in subset if item.annotation_id == 101)
    assert cat.box == (10, 20, 50, 60)


def test_class_names_are_in_category_id_order(subset):
    assert subset.class_names == CATEGORIES


def test_loading_reads_no_image(subset):
    # the image directory does not even exist: sizes come from the annotation file
    assert all(not item.image_path.exists() for item in subset)


def test_load_image_returns_rgb(tmp_path):
    Image.new("L", (40, 30), color=128).save(tmp_path / "gray.png")
    item = CocoItem(tmp_path / "gray.png", (40, 30), "cat", 1, 1, 1, (0, 0, 10, 10), 100.0, rect(0, 0, 10, 10))
    image = item.load_image()
    assert image.mode == "RGB" and image.size == (40, 30)


# --- masks ---------------------------------------------------------------------------------


def test_polygon_mask_covers_exactly_the_rectangle():
    mask = segmentation_to_mask(rect(10, 20, 40, 40), (80, 100))
    assert mask.shape == (100, 80) and mask.dtype == bool
    np.testing.assert_array_equal(mask, block_mask(100, 80, 20, 10, 60, 50))


def test_mask_of_several_polygons_is_their_union():
    mask = segmentation_to_mask(rect(0, 0, 10, 10) + rect(20, 20, 10, 10), (40, 40))
    assert mask.sum() == 200 and mask[5, 5] and mask[25, 25] and not mask[15, 15]


def test_compressed_rle_mask_decodes_to_the_original(subset):
    zebra = next(item for item in subset if item.annotation_id == 401)
    np.testing.assert_array_equal(zebra.mask(), block_mask(250, 200, 30, 20, 130, 90))


def test_uncompressed_crowd_rle_mask_decodes_to_the_original(annotation_file, tmp_path):
    everything = load_coco(annotation_file, tmp_path, min_area=0, unique_category=False, include_crowd=True)
    crowd = next(item for item in everything if item.annotation_id == 203)
    np.testing.assert_array_equal(crowd.mask(), block_mask(300, 400, 250, 0, 300, 100))


def test_item_mask_area_matches_annotation_area(subset):
    for item in subset:
        assert item.mask().sum() == pytest.approx(item.area, abs=1)


# --- object-removed pairs ------------------------------------------------------------------


def save_image(path, size):
    Image.new("RGB", size).save(path)


def test_removed_images_are_found_by_annotation_id_in_either_naming(tmp_path):
    save_image(tmp_path / "101.png", (4, 4))
    save_image(tmp_path / "4_401.jpg", (4, 4))
    (tmp_path / "notes.txt").write_text("ignored")
    save_image(tmp_path / "mask_101.png", (4, 4))  # not the convention: skipped
    save_image(tmp_path / "000000000104.png", (4, 4))  # COCO's zero-padded image file name, not annotation 104
    with pytest.warns(UserWarning, match=r"2 images in .* were skipped: 000000000104.png, mask_101.png$"):
        found = removed_image_paths(tmp_path)
    assert found == {101: (None, tmp_path / "101.png"), 401: (4, tmp_path / "4_401.jpg")}


def test_two_removed_images_for_one_annotation_are_an_error(tmp_path):
    save_image(tmp_path / "101.png", (4, 4))
    save_image(tmp_path / "1_101.png", (4, 4))
    with pytest.raises(ValueError, match="two object-removed images"):
        removed_image_paths(tmp_path)


def test_pairs_match_items_with_their_removed_images(subset, tmp_path):
    removed = tmp_path / "removed"
    removed.mkdir()
    save_image(removed / "101.png", (400, 300))
    save_image(removed / "4_401.png", (200, 250))
    pairs = pair_with_removed(subset, removed)
    assert [(p.item.annotation_id, p.removed_image_path.name) for p in pairs] == [(101, "101.png"), (401, "4_401.png")]
    assert pairs.class_names == subset.class_names  # the list prompt offers the dataset's classes
    assert pair_with_removed(list(subset), removed).class_names == sorted({item.class_name for item in subset})
    assert pairs[0].base_image_path == removed / "101.png"
    assert pairs[0].source_image_path == pairs[0].item.image_path


def test_items_without_removed_image_are_skipped_unless_required(subset, tmp_path):
    save_image(tmp_path / "101.png", (400, 300))
    assert len(pair_with_removed(subset, tmp_path)) == 1
    with pytest.raises(ValueError, match="no object-removed image"):
        pair_with_removed(subset, tmp_path, require_all=True)


def test_removed_image_of_another_size_is_an_error(subset, tmp_path):
    save_image(tmp_path / "101.png", (400, 299))
    with pytest.raises(ValueError, match="identical sizes"):
        pair_with_removed(subset, tmp_path)


def test_removed_image_named_after_another_image_is_an_error(subset, tmp_path):
    save_image(tmp_path / "7_101.png", (400, 300))
    with pytest.raises(ValueError, match="names image 7"):
        pair_with_removed(subset, tmp_path)


def test_an_image_of_another_size_than_the_annotation_file_says_is_an_error(subset, tmp_path):
    item = next(i for i in subset if i.annotation_id == 101)  # 400x300 in the JSON
    item.image_path.parent.mkdir(parents=True, exist_ok=True)
    save_image(item.image_path, (200, 150))  # a resized copy
    with pytest.raises(ValueError, match=r"one.jpg is 200x150 but the annotation file says 400x300: box and mask"):
        item.load_image()
    save_image(item.image_path, (400, 300))
    assert item.load_image().size == (400, 300)
