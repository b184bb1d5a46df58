"""LLaVA inputs: the chat template, tokens and pixels equal Hugging Face's processor, and the
image-token map agrees with what the processor actually does to the pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hooked_vlm import HookedVLM
from hooked_vlm.families.llava import render_prompt
from hooked_vlm.testing import load_hf_processor

QUESTIONS = ["What is in the image?", "Please provide the bounding box coordinates of the cat."]


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("llava_base")


@pytest.fixture(scope="module")
def model(base):
    return HookedVLM.from_pretrained(base)


def test_template_is_the_checkpoints_chat_template(base):
    processor = load_hf_processor(base)
    for question in QUESTIONS:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        assert processor.apply_chat_template(conversation, add_generation_prompt=True) == render_prompt(question, "hf")


def test_tokens_and_pixels_equal_the_hf_processor_batched_with_left_padding(model, base, photos):
    images = [photos["chelsea"], photos["grace_hopper"]]
    inputs = model.prepare(images, QUESTIONS)
    processor = load_hf_processor(base)
    processor.tokenizer.padding_side = "left"
    expected = processor(images=images, text=inputs.text, padding=True, return_tensors="pt")
    assert torch.equal(inputs.input_ids, expected["input_ids"])
    assert torch.equal(inputs.attention_mask, expected["attention_mask"])
    assert torch.equal(inputs.pixel_values, expected["pixel_values"])
    assert inputs.attention_mask[0].sum() < inputs.attention_mask[1].sum()  # the batch is padded


def test_layout_lists_every_image_token(model, photos):
    inputs = model.prepare([photos["rocket"], photos["astronaut"]], QUESTIONS)
    grid = model.cfg.vision.n_grid
    layout = inputs.layout
    assert len(layout) == 2 * grid * grid
    image_positions = torch.nonzero(inputs.input_ids == model.cfg.image_token_id)
    assert torch.equal(torch.stack([layout.batch, layout.position], 1), image_positions)
    for image in range(2):
        assert layout.grid(image).shape == (grid, grid)
        assert layout.view_names(image) == ["grid"]
        assert torch.equal(layout.row[layout.image == image], torch.arange(grid).repeat_interleave(grid))


def test_full_strategy_puts_a_cls_token_first(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_full"))
    layout = model.prepare(photos["coffee"], "What?").layout
    grid = model.cfg.vision.n_grid
    assert len(layout) == grid * grid + 1 and layout.row[0] == -1 and layout.col[0] == -1
    assert layout.grid(0).shape == (grid, grid)


@pytest.fixture(scope="module", params=["llava_base", "llava_multilayer"])  # 3 x 3 and 4 x 4 tokens
def grid_model(request, tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint(request.param))


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("photo", ["chelsea", "grace_hopper", "coffee_wide", "grace_hopper_tall", "astronaut"])
def test_painted_box_lights_up_exactly_the_predicted_tokens(grid_model, photos, mode, photo):
    model, image = grid_model, photos[photo]
    layout = model.prepare(image, "x", image_mode=mode).layout
    view = layout.views[0][0]
    box = _box_with_edges_mid_token(view, image.size)
    lit = _lit_positions(model, image, box, mode, layout)
    assert len(lit) > 0  # else the comparison below says nothing
    assert torch.equal(lit, layout.box_to_positions(box))
    mask = np.zeros((image.height, image.width), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    assert torch.equal(lit, layout.mask_to_positions(mask))


def _box_with_edges_mid_token(view, size, cols=(0, 1), rows=(1, 2)) -> tuple[int, int, int, int]:
    """An integer pixel box inside the image whose edges fall in the middle of tokens, so that
    the resampling's few pixels of bleed cannot reach a neighbouring token. `cols`/`rows` pick
    which of the visible token centres the edges sit on (fewer visible: a quarter-token box
    around the one centre)."""
    width, height = size
    u1, u2 = _edges(view.token_px, view.cols, (0 - view.offset_x) / view.scale_x, (width - view.offset_x) / view.scale_x, cols)
    v1, v2 = _edges(view.token_px, view.rows, (0 - view.offset_y) / view.scale_y, (height - view.offset_y) / view.scale_y, rows)
    x1, x2 = view.scale_x * u1 + view.offset_x, view.scale_x * u2 + view.offset_x
    y1, y2 = view.scale_y * v1 + view.offset_y, view.scale_y * v2 + view.offset_y
    return (math.ceil(x1), math.ceil(y1), math.floor(x2), math.floor(y2))


def _edges(t: float, n: int, lo: float, hi: float, pick: tuple[int, int]) -> tuple[float, float]:
    lo, hi = max(lo, 0), min(hi, n * t)
    centres = [(c + 0.5) * t for c in range(n) if lo + 2 <= (c + 0.5) * t <= hi - 2]
    if len(centres) > max(pick):
        return centres[pick[0]], centres[pick[1]]
    centre = centres[0] if centres else (lo + hi) / 2
    return centre - t / 4, centre + t / 4


def _lit_positions(model, image, box, mode, layout) -> torch.Tensor:
    painted = image.copy()
    ImageDraw.Draw(painted).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 255))
    before = model.prepare(image, "x", image_mode=mode).pixel_values[0]
    after = model.prepare(painted, "x", image_mode=mode).pixel_values[0]
    t = model.cfg.vision.patch_size
    changed = (after - before).abs().amax(0)  # [H, W]
    per_token = changed.unfold(0, t, t).unfold(1, t, t).amax((-1, -2)) > 1e-4
    return layout.grid(0)[per_token].sort().values


def test_pad_mode_tokens_over_the_padding_cover_no_pixels(model, photos):
    image = photos["coffee_wide"]  # 480 x 100: most of the padded square is padding
    layout = model.prepare(image, "x", image_mode="pad").layout
    area = (layout.box[:, 2] - layout.box[:, 0]) * (layout.box[:, 3] - layout.box[:, 1])
    assert (area == 0).any() and (area > 0).any()
    assert area.sum().item() == pytest.approx(image.width * image.height, rel=1e-6)


def test_crop_mode_tokens_cover_only_the_centre_square(model, photos):
    image = photos["chelsea"]  # 451 x 300: the crop drops the sides
    layout = model.prepare(image, "x", image_mode="crop").layout
    assert layout.box[:, 0].min() > 0 and layout.box[:, 2].max() < image.width
    assert layout.box[:, 1].min() == 0 and layout.box[:, 3].max() == pytest.approx(image.height)


def test_dilation_grows_and_erosion_shrinks_by_token_rings(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_multilayer"))  # 4 x 4 tokens
    image = photos["astronaut"]
    layout = model.prepare(image, "x").layout
    view, grid = layout.views[0][0], layout.grid(0)
    assert grid.shape == (4, 4)

    def positions(cells):
        return cells.flatten().sort().values

    centre = _box_with_edges_mid_token(view, image.size, cols=(1, 2), rows=(1, 2))
    assert torch.equal(layout.box_to_positions(centre), positions(grid[1:3, 1:3]))
    assert torch.equal(layout.box_to_positions(centre, dilation=1), positions(grid))
    assert len(layout.box_to_positions(centre, dilation=-1)) == 0
    corner = _box_with_edges_mid_token(view, image.size, cols=(0, 2), rows=(0, 2))
    assert torch.equal(layout.box_to_positions(corner), positions(grid[:3, :3]))
    # erosion treats cells beyond the grid's edge as covered: the object is not eaten from outside
    assert torch.equal(layout.box_to_positions(corner, dilation=-1), positions(grid[:2, :2]))
    assert torch.equal(layout.box_to_positions(corner, dilation=-2), positions(grid[:1, :1]))


def test_bad_layout_queries_raise(model, photos):
    image = photos["astronaut"]
    layout = model.prepare(image, "x").layout
    with pytest.raises(ValueError, match="outside image"):
        layout.box_to_positions((10, 10, 5000, 20))
    with pytest.raises(ValueError, match="mask is empty"):
        layout.mask_to_positions(np.zeros((image.height, image.width), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        layout.mask_to_positions(np.ones((5, 5), bool))
    with pytest.raises(ValueError, match=r"unknown views 'tiles'"):
        layout.positions(0, views="tiles")
    with pytest.raises(ValueError, match=r"must be \(x1, y1, x2, y2\)"):
        layout.box_to_positions((0, 0, 10))
    with pytest.raises(IndexError, match="view 3 out of range"):
        layout.positions(0, views=3)
    with pytest.raises(IndexError, match="image index 2"):
        layout.positions(2)


def test_bad_inputs_raise_clear_errors(model, photos):
    image = photos["astronaut"]
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        model.prepare([image, image], ["one prompt"])
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        model.prepare(np.zeros((10, 10, 3)), "x")
    with pytest.raises(ValueError, match="already contains '<image>'"):
        model.prepare(image, "<image> what is this?")
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        model.prepare(image, "USER: no placeholder ASSISTANT:", raw=True)
    with pytest.raises(ValueError, match="unknown LLaVA image mode"):
        model.prepare(image, "x", image_mode="stretch")


def test_raw_prompts_are_used_verbatim(model, photos):
    text = "USER: <image>\nDescribe. ASSISTANT:"
    inputs = model.prepare(photos["astronaut"], text, raw=True)
    assert inputs.text == [text]
    assert torch.equal(inputs.input_ids, model.prepare(photos["astronaut"], "Describe.").input_ids)


def test_vicuna_template_tokenises_chunks_around_the_image_like_llava(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    inputs = model.prepare(photos["astronaut"], "Describe.")
    ids = inputs.input_ids[0].tolist()
    tokenizer = model.tokenizer
    before, after = inputs.text[0].split("<image>")
    n = model.cfg.vision.n_grid**2
    first = ids.index(model.cfg.image_token_id)
    assert ids[:first] == tokenizer(before).input_ids
    assert ids[first + n :] == tokenizer(after).input_ids[1:]  # the second chunk loses its BOS
    assert ids.count(tokenizer.bos_token_id) == 1


def test_images_are_converted_to_rgb(model, photos):
    grey = photos["astronaut"].convert("L")
    inputs = model.prepare(grey, "x")
    assert inputs.pixel_values.shape[1] == 3
    assert isinstance(inputs.images[0], Image.Image) and inputs.images[0].mode == "RGB"
