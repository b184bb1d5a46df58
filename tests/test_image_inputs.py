"""`prepare` takes images as PIL images, paths, or uint8 pixel arrays (numpy `[H, W, C]`, torch
`[C, H, W]`), all giving the same inputs; anything else is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hooked_vlm import HookedVLM

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module", params=["llava_base", "internvl_300m", "internvl_moe"])
def model(request, tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint(request.param))


def _same_inputs(a, b) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values) and a.layout.image_sizes == b.layout.image_sizes


def test_paths_and_uint8_arrays_give_the_inputs_of_the_pil_image(model):
    path = ASSETS / "coffee_wide.jpg"
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    pixels = np.asarray(image)
    reference = model.prepare(image, "What is this?")
    for other in (path, str(path), pixels, torch.from_numpy(pixels.copy()).permute(2, 0, 1)):
        assert _same_inputs(model.prepare(other, "What is this?"), reference), type(other)
    grey = image.convert("L")
    as_grey = model.prepare(grey, "What is this?")
    for other in (np.asarray(grey), np.asarray(grey)[:, :, None], torch.from_numpy(np.array(grey))[None]):
        assert _same_inputs(model.prepare(other, "What is this?"), as_grey)
    both = model.prepare([path, pixels], ["What is this?", "And this?"])
    assert torch.equal(both.pixel_values, torch.cat([reference.pixel_values, reference.pixel_values]))


def test_bad_images_raise_clear_errors(model):
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        model.prepare([image, image], "one prompt")
    with pytest.raises(TypeError, match=r"image 0 is an array of float64; expected uint8 pixels"):
        model.prepare(np.zeros((10, 10, 3)), "x")
    with pytest.raises(ValueError, match=r"image 0 has array shape \(10, 10, 2\)"):
        model.prepare(np.zeros((10, 10, 2), np.uint8), "x")
    with pytest.raises(TypeError, match=r"image 1 is a dict; expected a PIL image, a path or URL"):
        model.prepare([image, {}], ["x", "y"])
    with pytest.raises(FileNotFoundError, match=r"image 0: no image file at '.*no_such_photo.jpg'"):
        model.prepare(ASSETS / "no_such_photo.jpg", "x")


def test_a_keyword_of_the_other_family_is_named(model):
    other = {"llava": "min_tiles", "internvl": "image_mode"}[model.cfg.family]
    with pytest.raises(TypeError, match=rf"prepare\(\) for {model.cfg.family} checkpoints takes no {other}; it takes raw, "):
        model.prepare(Image.new("RGB", (40, 30)), "What is this?", **{other: 1})


def test_transparency_is_composited_onto_white_as_hugging_face_does(model):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, opaque on the left half only
    rgba[:, :20, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    expected = model.prepare(on_white, "What is this?").pixel_values
    assert torch.equal(model.prepare(image, "What is this?").pixel_values, expected)
    assert torch.equal(model.prepare(rgba, "What is this?").pixel_values, expected)  # an RGBA array too
    assert not torch.equal(model.prepare(image.convert("RGB"), "What is this?").pixel_values, expected)
