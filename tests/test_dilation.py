"""Dilation and erosion of object token sets (§1.4) grow the mask by k tokens *in the image*:
across the seams between InternVL's tiles, with the thumbnail on its own, and with LLaVA's
padding-only tokens outside the image like cells beyond the grid's edge.

The reference is written from the layout's token pixel boxes alone: a token joins the k-dilated
set iff it covers image pixels and lies within grid distance k (Chebyshev, in the grid the tiles
form together) of an object token; it stays in the k-eroded set iff it is an object token and
every image token within distance k is one too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.inputs import ImageLayout, ViewGeometry


@pytest.fixture(scope="module")
def internvl():
    return HookedVLM.from_pretrained("toy-internvl")  # 32-px tiles of 4 x 4 tokens, 8 px each


@pytest.fixture(scope="module")
def llava():
    return HookedVLM.from_pretrained("toy-llava")  # 32 px, 8 x 8 tokens of 4 px


def _layout(model, width: int, height: int, **kwargs) -> ImageLayout:
    return model.prepare(Image.new("RGB", (width, height)), "x", **kwargs).layout


def _cells(layout: ImageLayout, positions: torch.Tensor, view: int) -> set[tuple[int, int]]:
    mask = layout.token_grid_mask(positions, 0, view)
    return {tuple(cell) for cell in mask.nonzero().tolist()}


def _reference(layout: ImageLayout, box, k: int, coords: np.ndarray) -> torch.Tensor:
    """The expected positions; `coords` is every token's (sheet, row, col)."""
    b = layout.box.numpy().astype(np.float64)
    x1, y1, x2, y2 = box
    on_image = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    covered = (np.minimum(b[:, 2], x2) - np.maximum(b[:, 0], x1) > 0) & (np.minimum(b[:, 3], y2) - np.maximum(b[:, 1], y1) > 0)
    same_sheet = coords[:, None, 0] == coords[None, :, 0]
    distance = np.abs(coords[:, None, 1:] - coords[None, :, 1:]).max(-1)
    near = same_sheet & (distance <= abs(k))
    if k >= 0:
        selected = on_image & (near & covered[None]).any(1)
    else:
        selected = covered & ~(near & (on_image & ~covered)[None]).any(1)
    return layout.position[torch.as_tensor(selected)].sort().values


def _tile_coords(layout: ImageLayout) -> np.ndarray:
    """(sheet, row, col) from the pixel boxes: the tiles share the image's token lattice (sheet
    -1), so a token's cell is its corner over its size; each global view is a sheet of its own."""
    b = layout.box.numpy().astype(np.float64)
    global_view = np.array([layout.views[0][v].is_global for v in layout.view.tolist()])
    sheet = np.where(global_view, layout.view.numpy(), -1)
    rows = np.round(b[:, 1] / (b[:, 3] - b[:, 1])).astype(int)
    cols = np.round(b[:, 0] / (b[:, 2] - b[:, 0])).astype(int)
    return np.stack([sheet, rows, cols], 1)


def _grid_coords(layout: ImageLayout) -> np.ndarray:
    return np.stack([layout.view.numpy(), layout.row.numpy(), layout.col.numpy()], 1)


def test_dilation_crosses_the_seam_between_tiles(internvl):
    layout = _layout(internvl, 64, 32)  # tile_0 | tile_1, then the thumbnail
    assert layout.view_names() == ["tile_0", "tile_1", "thumbnail"]
    box = (20, 8, 32, 20)  # ends exactly on the seam at x = 32
    assert _cells(layout, layout.box_to_positions(box), 1) == set()
    grown = layout.box_to_positions(box, dilation=1)
    assert _cells(layout, grown, 0) == {(r, c) for r in range(4) for c in range(1, 4)}
    assert _cells(layout, grown, 1) == {(r, 0) for r in range(4)}  # tile_1's first column touches it
    assert torch.equal(grown, _reference(layout, box, 1, _tile_coords(layout)))


def test_erosion_at_a_seam_eats_the_column_next_to_it(internvl):
    layout = _layout(internvl, 64, 32)
    box = (8, 8, 32, 32)  # tile_0 from its second row and column on; tile_1 is not the object
    eroded = layout.box_to_positions(box, dilation=-1)
    assert _cells(layout, eroded, 0) == {(2, 2), (3, 2)}  # the bottom edge is the image's; the seam is not
    assert _cells(layout, eroded, 1) == set()
    assert torch.equal(eroded, _reference(layout, box, -1, _tile_coords(layout)))


def test_views_pick_from_the_growth_over_the_whole_image(internvl):
    layout = _layout(internvl, 64, 32)
    box = (20, 8, 32, 20)
    grown = layout.box_to_positions(box, dilation=1)
    assert torch.equal(layout.box_to_positions(box, dilation=1, views=1), layout.grid(0, 1)[:, 0])
    local = layout.box_to_positions(box, dilation=1, views="local")
    thumbnail = layout.box_to_positions(box, dilation=1, views="global")
    assert torch.equal(torch.cat([local, thumbnail]).sort().values, grown)


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (96, 64), (100, 37), (128, 32)])
@pytest.mark.parametrize("k", [-2, -1, 1, 2])
def test_internvl_growth_matches_the_grid_distance_reference(internvl, size, k):
    layout = _layout(internvl, *size)
    width, height = size
    boxes = [
        (width * 0.3, height * 0.2, width * 0.55, height * 0.7),
        (0, 0, width * 0.6, height * 0.5),
        (width * 0.45, height * 0.4, width, height),
        (width / 2 - 1, height / 2 - 1, width / 2 + 1, height / 2 + 1),
    ]
    for box in boxes:
        expected = _reference(layout, box, k, _tile_coords(layout))
        assert torch.equal(layout.box_to_positions(box, dilation=k), expected), box
        mask = np.zeros((height, width), bool)
        mask[round(box[1]) : round(box[3]), round(box[0]) : round(box[2])] = True
        rounded = tuple(float(round(v)) for v in box)
        assert torch.equal(layout.mask_to_positions(mask, dilation=k), _reference(layout, rounded, k, _tile_coords(layout)))


def test_pad_mode_erosion_treats_padding_like_the_grid_edge(llava):
    wide, tall = _layout(llava, 64, 32, image_mode="pad"), _layout(llava, 32, 64, image_mode="pad")
    # wide: padding rows 0-1 above the image; tall: padding columns 0-1 left of it
    top = wide.box_to_positions((16, 0, 40, 24), dilation=-1)
    left = tall.box_to_positions((0, 16, 24, 40), dilation=-1)
    assert _cells(wide, top, 0) == {(2, 3), (3, 3)}  # the row on the image's top edge stays
    assert {(c, r) for r, c in _cells(tall, left, 0)} == _cells(wide, top, 0)
    assert torch.equal(top, _reference(wide, (16, 0, 40, 24), -1, _grid_coords(wide)))


def test_pad_mode_dilation_adds_no_padding_token(llava):
    layout = _layout(llava, 64, 32, image_mode="pad")
    grown = layout.box_to_positions((16, 0, 40, 24), dilation=2)
    assert _cells(layout, grown, 0) == {(r, c) for r in range(2, 6) for c in range(7)}  # image rows: 2..5
    assert torch.equal(grown, _reference(layout, (16, 0, 40, 24), 2, _grid_coords(layout)))


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("size", [(32, 32), (64, 32), (30, 50), (45, 37)])
@pytest.mark.parametrize("k", [-2, -1, 1, 2])
def test_llava_growth_matches_the_grid_distance_reference(llava, mode, size, k):
    layout = _layout(llava, *size, image_mode=mode)
    width, height = size
    boxes = [
        (0, 0, width * 0.5, height * 0.6),
        (width * 0.25, height * 0.3, width, height),
        (width * 0.2, height * 0.2, width * 0.8, height * 0.8),
    ]
    for box in boxes:
        assert torch.equal(layout.box_to_positions(box, dilation=k), _reference(layout, box, k, _grid_coords(layout))), box


def test_local_views_that_do_not_tile_a_rectangle_grow_on_their_own():
    """Two local views with a token-wide gap between them form no grid: each grows alone."""
    views = [
        ViewGeometry("left", 2, 2, 8.0, 1.0, 0.0, 1.0, 0.0, False),
        ViewGeometry("right", 2, 2, 8.0, 1.0, 24.0, 1.0, 0.0, False),  # x 24..40; 16..24 unseen
    ]
    layout = ImageLayout.build([(40, 16)], [views], [torch.arange(8)], [0])
    grown = layout.box_to_positions((8, 0, 16, 8), dilation=2)
    assert _cells(layout, grown, 0) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert _cells(layout, grown, 1) == set()  # two tokens away in the image, but in another grid


def test_sheet_index_joins_the_local_tiles_of_each_image(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_300m"))
    inputs = model.prepare([photos["chelsea"], photos["coffee_wide"]], ["What is this?", "Where is it?"])
    layout = inputs.layout
    assert any(sum(not g.is_global for g in image_views) > 1 for image_views in layout.views)  # tiles to join
    sheet, view = layout.sheet_index(), layout.view_index()
    for image, image_views in enumerate(layout.views):
        first = int(view[layout.image == image].min())
        for v, geometry in enumerate(image_views):
            tokens = (layout.image == image) & (layout.view == v) & (layout.row >= 0)
            expected = first + v if geometry.is_global else first + min(i for i, g in enumerate(image_views) if not g.is_global)
            assert (sheet[tokens] == expected).all(), (image, v)
    assert len(sheet.unique()) == sum(1 + any(not g.is_global for g in vs) for vs in layout.views if len(vs) > 1) + sum(len(vs) == 1 for vs in layout.views)


def test_select_images_numbers_rows_in_the_order_given(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    inputs = model.prepare([photos["chelsea"], photos["rocket"], photos["coffee"]], ["A?", "B?", "C?"])
    sub = inputs.layout.select_images([2, 0])
    assert sub.image_batch_row == [0, 1] and sub.image_sizes == [inputs.layout.image_sizes[2], inputs.layout.image_sizes[0]]
    old = inputs.layout
    assert torch.equal(sub.batch[sub.image == 0], torch.zeros_like(sub.batch[sub.image == 0]))
    assert torch.equal(sub.position[sub.image == 0], old.position[old.image == 2])


def test_views_may_be_numpy_integers(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))
    layout = model.prepare(photos["chelsea"], "What is this?").layout
    assert torch.equal(layout.positions(0, np.int64(1)), layout.positions(0, 1))
    assert torch.equal(layout.positions(0, np.array([0, 2])), layout.positions(0, [0, 2]))
