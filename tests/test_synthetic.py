"""Specification of the synthetic localization dataset (hooked_vlm.data.synthetic)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from hooked_vlm.boxes import parse_box
from hooked_vlm.data import prompts
from hooked_vlm.data.coco import load_coco, pair_with_removed
from hooked_vlm.data.shapes import SHAPES, dilate_mask, mask_box
from hooked_vlm.data.synthetic import (
    SyntheticLocalization,
    generate_item,
    text_corpus,
    vocabulary,
)

SIZES = [(112, 112), (112, 56), (84, 168)]


@pytest.fixture(scope="module")
def items():
    """A few dozen crowded, mixed-aspect items with every shape (rendering is ~3 ms each)."""
    ds = SyntheticLocalization(40, seed=7, image_sizes=SIZES, n_distractors=(2, 4),
                               shapes=SHAPES, object_size=(0.15, 0.35))
    return list(ds)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- determinism and splits --------------------------------------------------------------------


def test_item_depends_only_on_seed_split_and_index():
    ds = SyntheticLocalization(10, seed=3, image_sizes=SIZES)
    a = ds[4]
    b = SyntheticLocalization(500, seed=3, image_sizes=SIZES)[4]  # the size of the set is irrelevant
    c = generate_item(ds.config, seed=3, index=4)
    for other in (b, c):
        assert np.array_equal(_pixels(a.image), _pixels(other.image))
        assert np.array_equal(_pixels(a.removed_image), _pixels(other.removed_image))
        assert a.class_name == other.class_name and a.box == other.box


def test_different_seeds_give_different_items():
    a, b = SyntheticLocalization(1, seed=0)[0], SyntheticLocalization(1, seed=1)[0]
    assert not np.array_equal(_pixels(a.image), _pixels(b.image))


def test_held_out_split_is_a_different_stream_with_the_same_config():
    train = SyntheticLocalization(20, seed=0, image_sizes=SIZES)
    val = train.with_split("val", n=20)
    assert val.config == train.config and val.split == "val" and len(val) == 20
    train_images = {_pixels(item.image).tobytes() for item in train}
    assert not any(_pixels(item.image).tobytes() in train_images for item in val)


def test_negative_index_and_out_of_range():
    ds = SyntheticLocalization(5, seed=0)
    assert ds[-1].index == 4
    with pytest.raises(IndexError):
        ds[5]


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [True, False])
def test_removed_twin_differs_exactly_inside_the_target_mask_plus_one_pixel(antialias):
    ds = SyntheticLocalization(20, seed=1, image_sizes=SIZES, shapes=SHAPES, antialias=antialias)
    for item in ds:
        changed = (_pixels(item.image) != _pixels(item.removed_image)).any(axis=-1)
        assert changed[item.mask].all(), "every mask pixel must change"
        assert not (changed & ~dilate_mask(item.mask, 1)).any(), "nothing may change further out"


def test_thin_star_tips_do_not_tint_pixels_beyond_the_one_pixel_rim():
    # Unclipped, about one small star in ten would tint a pixel two or three pixels out.
    for item in SyntheticLocalization(200, seed=0, shapes=["star"], object_size=(6, 14),
                                      n_distractors=0):
        changed = (_pixels(item.image) != _pixels(item.removed_image)).any(axis=-1)
        assert not (changed & ~dilate_mask(item.mask, 1)).any()


def test_without_antialiasing_the_twin_differs_exactly_on_the_mask():
    for item in SyntheticLocalization(10, seed=2, shapes=SHAPES, antialias=False):
        changed = (_pixels(item.image) != _pixels(item.removed_image)).any(axis=-1)
        assert np.array_equal(changed, item.mask)


def test_masks_do_not_depend_on_antialiasing():
    smooth = SyntheticLocalization(10, seed=4, shapes=SHAPES, antialias=True)
    sharp = smooth.with_config(antialias=False)
    for a, b in zip(smooth, sharp):
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))


def test_boxes_tightly_bound_the_masks(items):
    for obj in (o for item in items for o in item.objects):
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        inside = np.zeros_like(obj.mask)
        inside[y1:y2, x1:x2] = True
        assert not (obj.mask & ~inside).any()
        assert obj.mask[y1].any() and obj.mask[y2 - 1].any()
        assert obj.mask[:, x1].any() and obj.mask[:, x2 - 1].any()


def test_objects_do_not_overlap_or_touch():
    crowded = SyntheticLocalization(60, seed=0, image_sizes=[(84, 84)], n_distractors=6,
                                    shapes=["square"], object_size=(0.2, 0.3))
    for item in crowded:
        for i, a in enumerate(item.objects):
            for b in item.objects[i + 1:]:
                assert not (dilate_mask(a.mask, 1) & dilate_mask(b.mask, 1)).any()


def test_target_class_is_unique_among_objects(items):
    for item in items:
        classes = [o.class_name for o in item.objects]
        assert classes.count(item.class_name) == 1
        assert item.class_name not in item.distractor_classes
        assert item.class_name == f"{item.colour} {item.shape}"


def test_non_square_sizes_are_honoured(items):
    assert {item.image_size for item in items} == set(SIZES)
    for item in items:
        width, height = item.image_size
        assert item.removed_image.size == (width, height)
        assert item.mask.shape == (height, width)
        assert 0 <= item.box[0] < item.box[2] <= width and 0 <= item.box[1] < item.box[3] <= height


def test_object_size_in_pixels_is_the_bounding_square_side():
    ds = SyntheticLocalization(10, seed=5, shapes=["square"], n_distractors=0,
                               object_size=(20, 20), antialias=False)
    for item in ds:
        x1, y1, x2, y2 = item.box
        assert x2 - x1 in (20, 21) and y2 - y1 in (20, 21)  # 20 px, wherever it lands on the grid


def test_object_size_as_fraction_of_the_shorter_side():
    ds = SyntheticLocalization(10, seed=5, image_sizes=[(160, 80)], shapes=["square"],
                               n_distractors=0, object_size=(0.5, 0.5))
    assert all(item.box[2] - item.box[0] in (40, 41) for item in ds)


def test_n_distractors_fixed_count_when_there_is_room():
    ds = SyntheticLocalization(10, seed=6, image_sizes=[(168, 168)], n_distractors=3,
                               object_size=(0.1, 0.15))
    assert all(len(item.distractor_classes) == 3 for item in ds)


def test_every_object_is_drawn_in_its_colour(items):
    for item in items:
        pixels = _pixels(item.image)
        for obj in item.objects:
            assert np.abs(np.median(pixels[obj.mask & ~_rim(obj.mask)], axis=0)
                          - np.asarray(obj.rgb)).max() <= 1


def _rim(mask: np.ndarray) -> np.ndarray:
    return mask & dilate_mask(~mask, 1)


def test_render_without_removes_any_object(items):
    item = items[0]
    k = len(item.objects) - 1
    changed = (_pixels(item.image) != _pixels(item.render_without(k))).any(axis=-1)
    assert changed[item.objects[k].mask].all() and not (changed & ~dilate_mask(item.objects[k].mask, 1)).any()


def test_unknown_shape_or_colour_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        SyntheticLocalization(1, seed=0, shapes=["blob"])
    with pytest.raises(ValueError, match="unknown"):
        SyntheticLocalization(1, seed=0, colours=["mauve"])


def test_mask_box_uses_pixel_edges():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:5] = True
    assert mask_box(mask) == (2.0, 1.0, 5.0, 3.0)


# --- prompts and answers -------------------------------------------------------------------------


def test_prompts_are_the_papers():
    assert prompts.localization_prompt("red circle") == \
        "Please provide the bounding box coordinates of the red circle."
    assert prompts.list_prompt(["red circle", "blue star"]) == \
        "List all objects in the image. Choose only from red circle, blue star."
    assert prompts.binary_prompt("red circle") == "Is there a red circle in the image?"


def test_llava_box_answer_is_a_normalised_list_that_parses_back(items):
    for item in items:
        answer = prompts.localization_answer(item.box, item.image_size, item.class_name, family="llava")
        assert re.fullmatch(r"\[(0|1)(\.\d{1,2})?(, (0|1)(\.\d{1,2})?){3}\]", answer), answer
        parsed = parse_box(answer, item.image_size, family="llava")
        side = max(item.image_size)  # padded square: rounding to 0.01 costs at most side / 200
        assert np.allclose(parsed, item.box, atol=side / 200 + 1e-6)


def test_internvl_box_answer_is_tagged_thousandths_that_parse_back(items):
    for item in items:
        answer = prompts.localization_answer(item.box, item.image_size, item.class_name, family="internvl")
        match = re.fullmatch(r"<ref>(.+)</ref><box>\[\[(\d+), (\d+), (\d+), (\d+)\]\]</box>", answer)
        assert match and match[1] == item.class_name
        assert all(0 <= int(v) <= 1000 for v in match.groups()[1:])
        parsed = parse_box(answer, item.image_size, family="internvl")
        width, height = item.image_size
        assert np.allclose(parsed, item.box, atol=max(width, height) / 1000 + 1e-6)


def test_examples_answer_yes_on_the_image_and_no_on_the_removed_twin(items):
    item = items[0]
    binary = [e for e in item.examples("llava") if e.task == "binary"]
    target_prompt = prompts.binary_prompt(item.class_name)
    assert [(e.prompt == target_prompt, e.object_removed, e.answer) for e in binary] == [
        (True, False, "Yes"), (True, True, "No"), (False, False, "No")]
    assert binary[1].image is item.removed_image
    assert item.absent_class not in [o.class_name for o in item.objects]


def test_list_answer_names_present_objects_and_drops_the_target_on_the_twin(items):
    item = items[0]
    original, removed = (e for e in item.examples("internvl") if e.task == "list")
    assert set(original.answer.split(", ")) == {o.class_name for o in item.objects}
    assert set(removed.answer.split(", ")) == set(item.distractor_classes)
    assert prompts.list_answer([], ["red circle"]) == prompts.NOTHING


def test_list_choices_default_to_every_class_and_can_be_subsampled():
    full = SyntheticLocalization(1, seed=0)[0]
    assert full.list_choices == SyntheticLocalization(1, seed=0).classes
    few = SyntheticLocalization(10, seed=0, n_list_choices=5)
    for item in few:
        assert len(item.list_choices) == 5 and len(set(item.list_choices)) == 5
        assert {o.class_name for o in item.objects} <= set(item.list_choices)


def test_vocabulary_covers_every_prompt_and_answer():
    ds = SyntheticLocalization(15, seed=9, image_sizes=SIZES, n_list_choices=6)
    vocab = set(vocabulary(ds.config))
    for text in text_corpus(ds):
        assert set(prompts.split_words(text)) <= vocab, text
    assert {"<ref>", "</ref>", "<box>", "</box>", "Yes", "No"} <= vocab


# --- COCO export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ds = SyntheticLocalization(6, seed=11, image_sizes=SIZES, n_distractors=(1, 3))
    out = tmp_path_factory.mktemp("synthetic_coco")
    return ds, out, ds.export_coco(out)


def test_export_writes_coco_json_whose_masks_and_boxes_match(exported):
    ds, out, path = exported
    subset = load_coco(path, out / "images", min_area=0, max_area=1, min_short_side=0)
    assert len(subset) == sum(len(item.objects) for item in ds)  # every object is annotated
    assert subset.class_names == list(ds.classes)
    by_image = {}
    for coco_item in subset:
        by_image.setdefault(coco_item.image_id, []).append(coco_item)
    for item in ds:
        coco_items = by_image[item.index + 1]
        for obj, coco_item in zip(item.objects, coco_items):
            assert coco_item.class_name == obj.class_name and coco_item.box == obj.box
            assert coco_item.image_size == item.image_size
            assert np.array_equal(coco_item.mask(), obj.mask)
            assert np.array_equal(_pixels(coco_item.load_image()), _pixels(item.image))


def test_export_pairs_each_target_with_its_removed_twin(exported):
    ds, out, path = exported
    subset = load_coco(path, out / "images", min_area=0, max_area=1, min_short_side=0)
    pairs = pair_with_removed(subset, out / "removed")
    assert len(pairs) == len(ds)
    targets = {a["id"] for a in json.loads(path.read_text())["annotations"] if a["is_target"]}
    for pair, item in zip(pairs, ds):
        assert pair.item.annotation_id in targets and pair.item.class_name == item.class_name
        assert pair.removed_image_path.name == f"{pair.item.annotation_id}.png"
        with Image.open(pair.removed_image_path) as removed:
            assert np.array_equal(_pixels(removed.convert("RGB")), _pixels(item.removed_image))


def test_export_can_write_a_twin_for_every_object(tmp_path):
    ds = SyntheticLocalization(3, seed=12, n_distractors=2)
    path = ds.export_coco(tmp_path, removed_for="all")
    n_annotations = len(json.loads(path.read_text())["annotations"])
    assert len(list((tmp_path / "removed").glob("*.png"))) == n_annotations
