"""InternVL inputs: the chat template, tokens and pixels equal Hugging Face's InternVLProcessor,
the dynamic tiling keeps every image within the tile limits, and the image-token map of every
tile and of the thumbnail agrees with what the processor actually does to the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from internvl_variants import VARIANTS, variant_directory
from PIL import Image, ImageDraw

from hooked_vlm import HookedVLM
from hooked_vlm.families.internvl import render_prompt
from hooked_vlm.testing import load_hf_processor

QUESTIONS = ["What is in the image?", "Please provide the bounding box coordinate of the cat."]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "grace_hopper", "coffee_wide", "grace_hopper_tall"]


@pytest.fixture(scope="module", params=VARIANTS)
def directory(request, tiny_checkpoint, tmp_path_factory):
    return variant_directory(request.param, tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def model(directory):
    return HookedVLM.from_pretrained(directory)


@pytest.fixture(scope="module")
def processor(directory):
    return load_hf_processor(directory)


def _conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_template_is_the_checkpoints_chat_template_byte_for_byte(processor):
    for question in QUESTIONS + ["", "Multi\nline  question? "]:
        expected = processor.apply_chat_template(_conversation(question), add_generation_prompt=True)
        assert render_prompt(question) == expected
    assert render_prompt("Hi") == "<|im_start|>user\n<IMG_CONTEXT>\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pair", [("chelsea", "grace_hopper_tall"), ("coffee_wide", "astronaut"), ("rocket", "coffee")])
def test_tokens_and_pixels_equal_the_hf_processor_batched_with_left_padding(model, processor, photos, pair):
    images = [photos[name] for name in pair]
    inputs = model.prepare(images, QUESTIONS)
    expected = processor(images=images, text=inputs.text, padding=True, return_tensors="pt")
    assert torch.equal(inputs.input_ids, expected["input_ids"])
    assert torch.equal(inputs.attention_mask, expected["attention_mask"])
    assert torch.equal(inputs.pixel_values, expected["pixel_values"])
    mask = inputs.attention_mask
    assert torch.equal(inputs.position_ids, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))


@pytest.mark.parametrize("limits", [(1, 1), (1, 2), (2, 3), (3, 12)])
def test_tile_limits_are_honoured_like_the_hf_processor(model, processor, photos, limits):
    """An image that wants more tiles than allowed is tiled within the limit, never dropped."""
    min_tiles, max_tiles = limits
    images = [photos["coffee_wide"], photos["grace_hopper"]]  # 480x100 wants 5 tiles
    inputs = model.prepare(images, QUESTIONS, min_tiles=min_tiles, max_tiles=max_tiles)
    expected = processor(
        images=images, text=inputs.text, padding=True, return_tensors="pt", min_patches=min_tiles, max_patches=max_tiles
    )
    assert torch.equal(inputs.input_ids, expected["input_ids"])
    assert torch.equal(inputs.pixel_values, expected["pixel_values"])
    for image in range(2):
        tiles = sum(v.name.startswith("tile_") for v in inputs.layout.views[image])
        assert min_tiles <= tiles <= max_tiles
        assert len(inputs.layout.views[image]) == tiles + (tiles > 1)  # a thumbnail only with several tiles


def test_photos_cover_one_several_and_the_maximum_number_of_tiles(model, photos):
    max_tiles = model.preprocessing.max_tiles
    counts = {name: len(model.prepare(photos[name], "x").layout.views[0]) for name in PHOTOS}
    small = photos["astronaut"].resize((40, 40), Image.BICUBIC)
    counts["small"] = len(model.prepare(small, "x").layout.views[0])
    assert counts["small"] == 1
    small_layout = model.prepare(small, "x").layout
    assert small_layout.views[0][0].is_global  # a lone tile sees the whole image: it is the global view
    assert len(small_layout.positions(0, "global")) == len(small_layout) and len(small_layout.positions(0, "local")) == 0
    assert counts["grace_hopper_tall"] == 3 + 1  # 120x400 -> 1 x 3 tiles + thumbnail
    assert max(counts.values()) == max_tiles + 1, counts


def test_layout_orders_tiles_row_major_then_the_thumbnail(model, photos):
    image = photos["chelsea"]  # 451x300: the widest grid the limit allows
    inputs = model.prepare([photos["grace_hopper_tall"], image], QUESTIONS)
    layout, pre = inputs.layout, model.preprocessing
    views = layout.views[1]
    tiles = [v for v in views if v.name.startswith("tile_")]
    cols = round(image.width / (tiles[0].scale_x * pre.tile_size))
    assert [v.name for v in views] == [f"tile_{k}" for k in range(len(tiles))] + ["thumbnail"]
    assert views[-1].is_global and not any(v.is_global for v in views[:-1])
    n = pre.view_grid
    assert all(v.rows == v.cols == n and v.token_px == pre.patch_size / pre.downsample_ratio for v in views)
    for k, view in enumerate(tiles):  # tile k at column k % cols, row k // cols
        assert view.offset_x == pytest.approx(image.width / cols * (k % cols))
        assert view.offset_y == pytest.approx(image.height / (len(tiles) // cols) * (k // cols))
    thumbnail = views[-1]
    assert (thumbnail.scale_x, thumbnail.scale_y) == (image.width / pre.tile_size, image.height / pre.tile_size)
    # positions: <img>, the views' tokens in order, each view contiguous and row-major, </img>
    ids = inputs.input_ids[1]
    positions = layout.positions(1)
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + len(views) * n * n))
    around = [ids[positions[0] - 1].item(), ids[positions[-1] + 1].item()]
    assert model.tokenizer.convert_ids_to_tokens(around) == ["<img>", "</img>"]
    for v in range(len(views)):
        grid = layout.grid(1, v)
        assert torch.equal(grid.flatten(), positions[v * n * n : (v + 1) * n * n])
    assert torch.equal(layout.positions(1, "global"), layout.grid(1, len(views) - 1).flatten())
    assert len(layout.positions(1, "local")) == len(tiles) * n * n


@pytest.mark.parametrize("photo", ["chelsea", "coffee_wide", "grace_hopper_tall", "astronaut"])
def test_tiles_partition_the_image_and_the_thumbnail_covers_it(model, photos, photo):
    image = photos[photo]
    layout = model.prepare(image, "x").layout
    area = (layout.box[:, 2] - layout.box[:, 0]) * (layout.box[:, 3] - layout.box[:, 1])
    image_area = image.width * image.height
    local = layout.view < sum(v.name.startswith("tile_") for v in layout.views[0])
    assert area[local].sum().item() == pytest.approx(image_area, rel=1e-6)
    if len(layout.views[0]) > 1:
        assert area[~local].sum().item() == pytest.approx(image_area, rel=1e-6)
    assert layout.box[:, 0].min() == 0 and layout.box[:, 2].max() == pytest.approx(image.width)


@pytest.mark.parametrize("photo", ["chelsea", "coffee_wide", "grace_hopper_tall", "grace_hopper"])
def test_painted_box_lights_up_exactly_the_predicted_tokens_in_every_view(model, photos, photo):
    """Paint a box whose edges sit mid-token in *every* view (so bicubic bleed, a couple of view
    pixels, cannot reach a neighbouring token), run the processor, and compare the tokens whose
    pixels changed with `box_to_positions` view by view: every tile and the thumbnail."""
    image = photos[photo]
    inputs = model.prepare(image, "x")
    layout = inputs.layout
    box = _box_with_edges_mid_token_in_every_view(layout.views[0], image.size)
    painted = image.copy()
    ImageDraw.Draw(painted).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 255))
    changed = (model.prepare(painted, "x").pixel_values - inputs.pixel_values).abs().amax(1)  # [view, H, W]
    t = round(layout.views[0][0].token_px)
    lit_views = 0
    for v in range(len(layout.views[0])):
        per_token = changed[v].unfold(0, t, t).unfold(1, t, t).amax((-1, -2)) > 1e-4
        lit = layout.grid(0, v)[per_token].sort().values
        assert torch.equal(lit, layout.box_to_positions(box, views=v)), layout.views[0][v].name
        lit_views += len(lit) > 0
    assert lit_views >= min(2, len(layout.views[0]))  # the box shows in a tile and in the thumbnail
    mask = np.zeros((image.height, image.width), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    assert torch.equal(layout.mask_to_positions(mask), layout.box_to_positions(box))


def _margin(x: int, views, axis: str, extent: int) -> float:
    """Distance, in view pixels, from original coordinate `x` to the nearest token edge of any view
    that sees it (0 on a tile border)."""
    margins = []
    for view in views:
        scale, offset = (view.scale_x, view.offset_x) if axis == "x" else (view.scale_y, view.offset_y)
        u = (x - offset) / scale
        size = (view.cols if axis == "x" else view.rows) * view.token_px
        if 0 <= u <= size:
            r = u % view.token_px
            margins.append(min(r, view.token_px - r))
    return min(margins)


def _box_with_edges_mid_token_in_every_view(views, size) -> tuple[int, int, int, int]:
    edges = []
    for axis, extent in zip("xy", size):
        best = []
        for lo, hi in ((0.1, 0.45), (0.55, 0.9)):
            candidates = range(max(1, int(lo * extent)), int(hi * extent))
            best.append(max(candidates, key=lambda x: _margin(x, views, axis, extent)))
        assert min(_margin(x, views, axis, extent) for x in best) >= 3, (axis, best)
        edges.append(best)
    (x1, x2), (y1, y2) = edges
    return x1, y1, x2, y2


def test_bad_inputs_raise_clear_errors(model, photos):
    image = photos["astronaut"]
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        model.prepare([image, image], ["one prompt"])
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        model.prepare([image], ["one", "two"])
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        model.prepare(np.zeros((10, 10, 3)), "x")
    with pytest.raises(ValueError, match=r"contains '<IMG_CONTEXT>'; the template places the image itself"):
        model.prepare(image, "<IMG_CONTEXT> what is this?")
    with pytest.raises(ValueError, match=r"contains '<image>'"):
        model.prepare(image, "<image>\nwhat is this?")
    # <image> is the placeholder of older processors and of the original chat(): say what to use
    with pytest.raises(ValueError, match=r"'<image>'.*older InternVL.*expects '<IMG_CONTEXT>'"):
        model.prepare(image, "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n", raw=True)
    with pytest.raises(ValueError, match=r"exactly one '<IMG_CONTEXT>'.*found 0"):
        model.prepare(image, "no placeholder", raw=True)
    with pytest.raises(ValueError, match=r"exactly one '<IMG_CONTEXT>'.*found 2"):
        model.prepare(image, "<IMG_CONTEXT><IMG_CONTEXT>", raw=True)
    with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
        model.prepare(image, "x", min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError, match="unknown InternVL template"):
        model.prepare(image, "x", template="vicuna_v1")


def test_raw_prompts_are_used_verbatim(model, photos):
    text = "<|im_start|>user\n<IMG_CONTEXT>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
    inputs = model.prepare(photos["astronaut"], text, raw=True)
    assert inputs.text == [text]
    assert torch.equal(inputs.input_ids, model.prepare(photos["astronaut"], "Describe.").input_ids)


def test_internvl2_5_template_adds_the_original_system_prompt(model, photos):
    inputs = model.prepare(photos["astronaut"], "Describe.", template="internvl2_5")
    assert inputs.text[0].startswith("<|im_start|>system\n你是书生·万象")
    assert inputs.text[0].endswith("<|im_start|>user\n<IMG_CONTEXT>\nDescribe.<|im_end|>\n<|im_start|>assistant\n")


def test_answers_follow_the_prompt_as_the_chat_template_renders_an_assistant_turn(model, processor, photos):
    images, answers = [photos["chelsea"], photos["astronaut"]], ["A cat.", "<ref>astronaut</ref><box>[[1, 2, 3, 4]]</box>"]
    inputs = model.prepare(images, QUESTIONS, answers=answers)
    plain = model.prepare(images, QUESTIONS)
    for row, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        turn = _conversation(question) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = processor.apply_chat_template(turn)
        assert text.endswith("<|im_end|>\n")
        expected = processor(images=[images[row]], text=[text.removesuffix("\n")], return_tensors="pt")["input_ids"][0]
        ids = inputs.input_ids[row][inputs.attention_mask[row].bool()]
        assert torch.equal(ids, expected)
        n_answer = int(inputs.answer_mask[row].sum())
        assert torch.equal(ids[:-n_answer], plain.input_ids[row][plain.attention_mask[row].bool()])
        assert model.tokenizer.decode(ids[-n_answer:]) == answer + "<|im_end|>"
    image_tokens = torch.nonzero(inputs.input_ids == model.cfg.image_token_id)
    assert torch.equal(torch.stack([inputs.layout.batch, inputs.layout.position], 1), image_tokens)
