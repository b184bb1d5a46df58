"""Box formats of LLaVA-1.5 and InternVL (PAPER_PROTOCOL §4, ARCHITECTURES pitfall 13) and IoU."""

import numpy as np
import pytest

from hooked_vlm.boxes import (
    FrameWindow,
    box_from_frame,
    box_to_frame,
    format_box,
    frame_window,
    iou,
    iou_array,
    parse_box,
    parse_boxes,
    parsed_boxes,
)

WIDE = (640, 480)
TALL = (480, 640)
ODD_WIDE = (640, 427)  # long side does not scale to an integer: exercises llava-hf truncation
VERY_WIDE = (480, 100)
VERY_TALL = (120, 400)
SIZES = [WIDE, TALL, ODD_WIDE, VERY_WIDE, VERY_TALL, (300, 300)]
FAMILY_FRAMES = [("llava", "padded"), ("llava", "original"), ("llava", "crop"), ("internvl", "original")]


def central_box(size):
    """A box inside the image and inside the llava-hf centre crop (even at 480x100: x 190..290)."""
    w, h = size
    return (0.42 * w, 0.41 * h, 0.58 * w, 0.6 * h)


def assert_close_box(actual, expected, tol):
    assert actual is not None
    np.testing.assert_allclose(actual, expected, atol=tol)


# --- frames --------------------------------------------------------------------------------


def test_original_frame_is_the_image():
    assert frame_window(WIDE, "original") == FrameWindow(0, 0, 640, 480)


def test_padded_frame_of_wide_image_pads_top_and_bottom_equally():
    assert frame_window(WIDE, "padded") == FrameWindow(0, -80, 640, 640)


def test_padded_frame_of_tall_image_pads_left_and_right_equally():
    assert frame_window(TALL, "padded") == FrameWindow(-80, 0, 640, 640)


def test_padded_frame_uses_floor_of_half_the_padding_like_expand2square():
    # 640 - 427 = 213 rows of padding: 106 above the image, 107 below
    assert frame_window(ODD_WIDE, "padded").top == -106


def test_crop_frame_of_wide_image_keeps_the_central_square():
    # 640x480 -> resized 448x336 -> crop left int(112 / 2) = 56 resized px = 80 original px
    assert frame_window(WIDE, "crop") == FrameWindow(80, 0, 480, 480)


def test_crop_frame_of_tall_image_keeps_the_central_square():
    assert frame_window(TALL, "crop") == FrameWindow(0, 80, 480, 480)


def test_crop_frame_follows_the_truncated_resize_of_llava_hf():
    # 640x427: long side int(336 * 640 / 427) = 503, crop left int(167 / 2) = 83 resized px
    window = frame_window(ODD_WIDE, "crop")
    assert window.left == pytest.approx(83 * 640 / 503)
    assert window.width == pytest.approx(336 * 640 / 503)
    assert (window.top, window.height) == (0, 427)


def test_crop_frame_of_square_image_is_the_image():
    assert frame_window((300, 300), "crop") == FrameWindow(0, 0, 300, 300)


def test_box_to_frame_and_back_is_identity():
    box = central_box(ODD_WIDE)
    for frame in ("padded", "original", "crop"):
        assert_close_box(box_from_frame(box_to_frame(box, ODD_WIDE, frame), ODD_WIDE, frame), box, 1e-9)


def test_box_from_frame_clips_padding_to_the_image():
    assert box_from_frame((0.0, 0.0, 1.0, 1.0), WIDE, "padded") == (0, 0, 640, 480)


# --- format --------------------------------------------------------------------------------


def test_llava_format_is_a_list_of_two_decimal_fractions():
    assert format_box((390.4, 230.4, 588.8, 531.2), (640, 640), family="llava") == "[0.61, 0.36, 0.92, 0.83]"


def test_llava_format_prints_floats_as_python_does():
    assert format_box((0, 0, 320, 640), (640, 640), family="llava") == "[0.0, 0.0, 0.5, 1.0]"


def test_llava_format_defaults_to_the_padded_frame():
    # y = 80 is the top edge of the image inside the padded 640x640 square
    assert format_box((0, 0, 640, 480), WIDE, family="llava") == "[0.0, 0.12, 1.0, 0.88]"


def test_llava_format_in_original_frame_normalises_each_axis_by_its_side():
    assert format_box((0, 0, 640, 480), WIDE, family="llava", frame="original") == "[0.0, 0.0, 1.0, 1.0]"


def test_llava_format_ignores_the_label():
    assert "cat" not in format_box(central_box(WIDE), WIDE, family="llava", label="cat")


def test_llava_format_clips_a_box_to_the_crop():
    assert format_box((0, 0, 320, 480), WIDE, family="llava", frame="crop") == "[0.0, 0.0, 0.5, 1.0]"


def test_llava_format_rejects_a_box_entirely_outside_the_crop():
    with pytest.raises(ValueError, match="crop"):
        format_box((0, 0, 60, 480), WIDE, family="llava", frame="crop")


def test_internvl_format_has_ref_and_box_tags_with_thousandths():
    text = format_box((64, 48, 320, 480), WIDE, family="internvl", label="cat")
    assert text == "<ref>cat</ref><box>[[100, 100, 500, 1000]]</box>"


def test_internvl_format_without_label_has_only_the_box_tag():
    assert format_box((64, 48, 320, 480), WIDE, family="internvl") == "<box>[[100, 100, 500, 1000]]</box>"


def test_internvl_format_truncates_like_internvl_data_code():
    # 1 / 3 * 1000 = 333.33 -> 333 ; 2 / 3 * 1000 = 666.67 -> 666 (int truncates)
    assert format_box((1, 1, 2, 2), (3, 3), family="internvl") == "<box>[[333, 333, 666, 666]]</box>"


@pytest.mark.parametrize(
    "box, size, kwargs",
    [
        ((10, 10, 5, 20), WIDE, {"family": "llava"}),  # x1 > x2
        ((10, 10, 10, 20), WIDE, {"family": "llava"}),  # empty
        ((10, 10, 700, 20), WIDE, {"family": "llava"}),  # outside the image
        ((-1, 10, 50, 20), WIDE, {"family": "internvl"}),  # outside the image
        ((10, 10, 50, 20), (0, 480), {"family": "llava"}),  # non-positive size
        ((10, 10, 50, 20), WIDE, {"family": "qwen"}),  # unknown family
        ((10, 10, 50, 20), WIDE, {"family": "llava", "frame": "letterbox"}),  # unknown frame
        ((10, 10, 50, 20), WIDE, {"family": "internvl", "frame": "padded"}),  # InternVL is original only
    ],
)
def test_format_rejects_bad_programmer_input(box, size, kwargs):
    with pytest.raises(ValueError):
        format_box(box, size, **kwargs)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("family, frame", FAMILY_FRAMES)
@pytest.mark.parametrize("size", SIZES)
def test_format_then_parse_recovers_the_box(family, frame, size):
    box = central_box(size)
    parsed = parse_box(format_box(box, size, family=family, frame=frame), size, family=family, frame=frame)
    # quantisation: half a hundredth of the frame for LLaVA, one thousandth of the side for InternVL
    window = frame_window(size, frame)
    tol = 0.005 * max(window.width, window.height) if family == "llava" else max(size) / 1000
    assert_close_box(parsed, box, tol + 1e-9)


@pytest.mark.parametrize("family, frame", FAMILY_FRAMES)
def test_round_trip_keeps_iou_high_on_a_very_wide_image(family, frame):
    box = central_box(VERY_WIDE)
    parsed = parse_box(format_box(box, VERY_WIDE, family=family, frame=frame), VERY_WIDE, family=family, frame=frame)
    assert iou(parsed, box) > 0.85


def test_parsing_in_the_wrong_frame_moves_the_box():
    box = central_box(WIDE)
    text = format_box(box, WIDE, family="llava", frame="padded")
    assert iou(parse_box(text, WIDE, family="llava", frame="original"), box) < 0.9


# --- parsing LLaVA answers -----------------------------------------------------------------


def test_llava_parses_a_bracketed_list():
    assert parse_box("[0.1, 0.2, 0.5, 0.6]", (100, 100), family="llava") == (10, 20, 50, 60)


def test_llava_parses_a_list_without_spaces():
    assert parse_box("[0.1,0.2,0.5,0.6]", (100, 100), family="llava") == (10, 20, 50, 60)


def test_llava_parses_a_list_without_brackets():
    assert parse_box("The bounding box is 0.1, 0.2, 0.5, 0.6.", (100, 100), family="llava") == (10, 20, 50, 60)


def test_llava_parses_a_list_inside_a_sentence():
    text = "Sure! The cat is at [0.1, 0.2, 0.5, 0.6] in the image."
    assert parse_box(text, (100, 100), family="llava") == (10, 20, 50, 60)


def test_llava_parses_integers_as_fractions():
    assert parse_box("[0, 0, 1, 1]", (100, 100), family="llava") == (0, 0, 100, 100)


def test_llava_parses_several_boxes_in_order():
    boxes = parse_boxes("[0.1, 0.1, 0.2, 0.2] and [0.5, 0.5, 0.9, 0.9]", (100, 100), family="llava")
    assert boxes == [(10, 10, 20, 20), (50, 50, 90, 90)]


def test_llava_parse_box_returns_the_first_of_several():
    assert parse_box("[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.2, 0.2]", (100, 100), family="llava") == (50, 50, 90, 90)


def test_llava_clips_values_slightly_outside_the_unit_square():
    assert parse_box("[-0.02, 0.2, 1.03, 0.6]", (100, 100), family="llava") == (0, 20, 100, 60)


def test_llava_rejects_pixel_coordinates():
    assert parse_box("[120, 45, 300, 200]", WIDE, family="llava") is None


def test_llava_rejects_swapped_corners():
    assert parse_box("[0.5, 0.2, 0.1, 0.6]", (100, 100), family="llava") is None


def test_llava_rejects_an_empty_box():
    assert parse_box("[0.5, 0.2, 0.5, 0.6]", (100, 100), family="llava") is None


def test_llava_rejects_lists_of_the_wrong_length():
    assert parse_boxes("[0.1, 0.2, 0.5] or [0.1, 0.2, 0.5, 0.6, 0.7]", (100, 100), family="llava") == []


def test_llava_skips_malformed_lists_but_keeps_a_good_one():
    assert parse_box("[0.1, 0.2] then [0.1, 0.2, 0.5, 0.6]", (100, 100), family="llava") == (10, 20, 50, 60)


def test_llava_padded_box_maps_back_to_image_pixels():
    # padded 640x640 square, image rows 80..560
    assert_close_box(parse_box("[0.25, 0.25, 0.75, 0.75]", WIDE, family="llava"), (160, 80, 480, 400), 1e-9)


def test_llava_box_on_the_padding_only_is_dropped():
    assert parse_box("[0.1, 0.0, 0.9, 0.1]", WIDE, family="llava", frame="padded") is None


def test_llava_box_is_clipped_to_the_image():
    assert parse_box("[0.0, 0.0, 1.0, 1.0]", TALL, family="llava", frame="padded") == (0, 0, 480, 640)


def test_llava_crop_box_maps_into_the_crop():
    assert parse_box("[0.0, 0.0, 1.0, 1.0]", WIDE, family="llava", frame="crop") == (80, 0, 560, 480)


# --- parsing InternVL answers --------------------------------------------------------------


def test_internvl_parses_ref_and_box_tags():
    text = "<ref>cat</ref><box>[[100, 200, 500, 1000]]</box>"
    assert parse_box(text, WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_an_answer_with_tags_stripped():
    # what model.chat() returns: skip_special_tokens=True removes <ref>, <box> and their ends
    assert parse_box("cat[[100, 200, 500, 1000]]", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_a_box_without_ref():
    assert parse_box("<box>[[100, 200, 500, 1000]]</box>", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_a_box_without_closing_tag():
    assert parse_box("<ref>cat</ref><box>[[100, 200, 500, 1000]]", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_an_answer_cut_off_before_the_closing_brackets():
    assert parse_box("<box>[[100, 200, 500, 1000", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_several_boxes_in_one_list():
    boxes = parse_boxes("<box>[[0, 0, 500, 500], [500, 500, 1000, 1000]]</box>", WIDE, family="internvl")
    assert boxes == [(0, 0, 320, 240), (320, 240, 640, 480)]


def test_internvl_parses_a_single_bracket_list():
    assert parse_box("[100, 200, 500, 1000]", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_parses_floats_on_the_thousand_scale():
    assert parse_box("[[100.0, 200.5, 500, 1000]]", (1000, 1000), family="internvl") == (100, 200.5, 500, 1000)


def test_internvl_box_written_as_unit_floats_is_read_as_fractions_of_the_image():
    """InternVL's evaluator reads a box summing to < 4 as fractions (PROTOCOL-AUDIT B2)."""
    assert parse_box("<box>[[0.12, 0.30, 0.56, 0.80]]</box>", (1000, 500), family="internvl") == (120, 150, 560, 400)


def test_internvl_integer_box_is_read_in_thousandths_whatever_the_float_rule():
    for float_boxes in ("official", "thousandths"):
        assert parse_box("[[100, 200, 500, 1000]]", WIDE, family="internvl", float_boxes=float_boxes) == (64, 96, 320, 480)


def test_internvl_float_box_summing_to_four_or_more_is_read_in_thousandths_as_the_evaluator_does():
    # 0.5 + 0.9 + 1.2 + 1.8 = 4.4 >= 4: the evaluator divides by 1000, a sub-pixel box
    box = parse_box("[[0.5, 0.9, 1.2, 1.8]]", (1000, 1000), family="internvl")
    np.testing.assert_allclose(box, (0.5, 0.9, 1.2, 1.8))
    assert parsed_boxes("[[0.5, 0.9, 1.2, 1.8]]", WIDE, family="internvl")[0].float_box is False


def test_internvl_box_summing_just_under_four_is_fractions_even_in_integers():
    # the rule is the evaluator's sum, not a decimal point: [[0, 0, 1, 1]] is the whole image
    assert parse_box("[[0, 0, 1, 1]]", WIDE, family="internvl") == (0, 0, 640, 480)
    assert parse_box("[[0, 0, 1, 3]]", (1000, 1000), family="internvl") == (0, 0, 1, 3)  # sum 4


def test_internvl_float_rule_can_be_turned_off():
    box = parse_box("[[0.12, 0.30, 0.56, 0.80]]", (1000, 500), family="internvl", float_boxes="thousandths")
    np.testing.assert_allclose(box, (0.12, 0.15, 0.56, 0.4))  # on the 0-1000 scale: a sub-pixel box


def test_parsed_boxes_say_which_boxes_were_written_as_floats():
    text = "[[0.1, 0.2, 0.5, 0.6]] or [[100, 200, 500, 600]]"
    for float_boxes in ("official", "thousandths"):  # written so, however it is read
        parsed = parsed_boxes(text, WIDE, family="internvl", float_boxes=float_boxes)
        assert [p.float_box for p in parsed] == [True, False]
    assert [p.float_box for p in parsed_boxes("[0.1, 0.2, 0.5, 0.6]", WIDE, family="llava")] == [False]


def test_float_rule_is_checked_and_is_internvl_only():
    with pytest.raises(ValueError, match="unknown float_boxes"):
        parse_box("[[1, 2, 3, 4]]", WIDE, family="internvl", float_boxes="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LLaVA writes fractions"):
        parse_box("[0.1, 0.2, 0.5, 0.6]", WIDE, family="llava", float_boxes="thousandths")
    assert format_box((10, 10, 20, 20), WIDE, family="internvl", float_boxes="thousandths").startswith("<box>")


def test_internvl_clips_values_slightly_above_1000():
    assert parse_box("[[100, 200, 500, 1020]]", WIDE, family="internvl") == (64, 96, 320, 480)


def test_internvl_rejects_values_far_above_1000():
    assert parse_box("[[100, 200, 500, 1500]]", WIDE, family="internvl") is None


def test_internvl_rejects_swapped_corners():
    assert parse_box("[[500, 200, 100, 1000]]", WIDE, family="internvl") is None


# --- garbage -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize(
    "text",
    ["", "I cannot see a cat.", "[x1, y1, x2, y2]", "[[", "]]]", "1.2.3.4", "[a, b, c, d]", "[0.1, 0.2, 0.3]"],
)
def test_garbage_parses_to_nothing(family, text):
    assert parse_boxes(text, WIDE, family=family) == []
    assert parse_box(text, WIDE, family=family) is None


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_non_string_output_parses_to_nothing(family):
    assert parse_box(None, WIDE, family=family) is None  # type: ignore[arg-type]


def test_parse_rejects_an_unknown_family():
    with pytest.raises(ValueError):
        parse_box("[0.1, 0.2, 0.5, 0.6]", WIDE, family="qwen")  # type: ignore[arg-type]


# --- IoU -----------------------------------------------------------------------------------


def test_iou_of_identical_boxes_is_one():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0


def test_iou_of_disjoint_boxes_is_zero():
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_iou_of_boxes_touching_at_an_edge_is_zero():
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_iou_of_half_overlap():
    # intersection 50, union 150
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_iou_of_nested_boxes_is_the_area_ratio():
    assert iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)


def test_iou_is_symmetric():
    a, b = (0, 0, 10, 7), (3, 2, 12, 9)
    assert iou(a, b) == iou(b, a)


def test_iou_of_two_empty_boxes_is_zero():
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0


def test_iou_array_matches_iou_elementwise():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, size=(50, 2, 2))
    a = np.concatenate([corners[:, 0].min(1, keepdims=True), corners[:, 1].min(1, keepdims=True)], 1)
    boxes_a = np.concatenate([a, a + rng.uniform(1, 30, size=(50, 2))], 1)
    boxes_b = boxes_a[::-1] + rng.uniform(-5, 5, size=(50, 4)).clip(-0.5, 0.5)
    expected = [iou(tuple(x), tuple(y)) for x, y in zip(boxes_a, boxes_b)]
    np.testing.assert_allclose(iou_array(boxes_a, boxes_b), expected)


def test_iou_array_broadcasts_to_all_pairs():
    a = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]], dtype=float)
    np.testing.assert_allclose(iou_array(a[:, None], b[None]), [[1, 0, 0.5], [1 / 3, 0, 0]])


def test_iou_array_gives_nan_for_a_missing_prediction():
    result = iou_array(np.array([[np.nan] * 4, [0, 0, 10, 10]]), np.array([[0, 0, 10, 10]] * 2))
    assert np.isnan(result[0]) and result[1] == 1.0
