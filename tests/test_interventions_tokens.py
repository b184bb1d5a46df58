"""Token sets: built from the layout, combined as sets, placed on decoding steps; random controls
are seeded and size-matched; LM image tokens map onto the vision patches they come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv

CHECKPOINTS = ["llava_base", "llava_full", "internvl_6b"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def model_and_inputs(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is the rocket? Answer briefly.", "Hi"])
    return model, inputs


def _box(image, lo=0.3, hi=0.65):
    w, h = image.size
    return (w * lo, h * lo, w * hi, h * hi)


def test_object_tokens_are_the_layout_positions_of_each_image_in_its_row(model_and_inputs):
    model, inputs = model_and_inputs
    boxes = [_box(image) for image in inputs.images]
    tokens = iv.object_tokens(inputs, boxes, dilation=1)
    for image, box in enumerate(boxes):
        row = inputs.layout.image_batch_row[image]
        expected = inputs.layout.box_to_positions(box, image, dilation=1)
        assert torch.equal(tokens.positions(row), expected.sort().values)


def test_object_tokens_accept_masks_and_views(model_and_inputs):
    model, inputs = model_and_inputs
    masks = []
    for image in inputs.images:
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[image.height // 3 : image.height // 2, image.width // 4 : image.width // 2] = True
        masks.append(mask)
    every = iv.object_tokens(inputs, masks)
    glob, local = iv.object_tokens(inputs, masks, views="global"), iv.object_tokens(inputs, masks, views="local", allow_empty=True)
    assert torch.equal((glob | local).mask, every.mask)
    assert not (glob & local).mask.any()
    assert torch.equal(iv.image_tokens(inputs, "global").mask | iv.image_tokens(inputs, "local").mask, iv.image_tokens(inputs).mask)


def test_bad_regions_are_clear_errors(model_and_inputs):
    _, inputs = model_and_inputs
    w, h = inputs.images[0].size
    with pytest.raises(ValueError, match="outside image 0"):
        iv.object_tokens(inputs, [(0, 0, w + 50, h), _box(inputs.images[1])])
    with pytest.raises(ValueError, match="mask is empty"):
        iv.object_tokens(inputs, [np.zeros((h, w), dtype=bool), None])
    with pytest.raises(ValueError, match="2 images"):
        iv.object_tokens(inputs, [_box(inputs.images[0])])
    tiny = (w * 0.5, h * 0.5, w * 0.5 + 1, h * 0.5 + 1)
    with pytest.raises(ValueError, match="selects no token"):
        iv.object_tokens(inputs, [tiny, None], dilation=-1)
    assert not iv.object_tokens(inputs, [tiny, None], dilation=-1, allow_empty=True).mask.any()
    with pytest.raises(IndexError, match="out of range"):
        iv.positions(inputs, {0: [inputs.input_ids.shape[1]]})


def test_after_image_is_every_real_token_after_the_image_span(model_and_inputs):
    _, inputs = model_and_inputs
    after = iv.after_image(inputs)
    for row in range(len(inputs)):
        last = int(inputs.layout.position[inputs.layout.batch == row].max())
        expected = torch.arange(last + 1, inputs.input_ids.shape[1])
        assert torch.equal(after.positions(row), expected)
    assert after.include_generated and not iv.after_image(inputs, include_generated=False).include_generated


def test_window_places_decoding_steps_after_the_prompt(model_and_inputs):
    _, inputs = model_and_inputs
    n = inputs.input_ids.shape[1]
    after, image = iv.after_image(inputs), iv.image_tokens(inputs)
    assert torch.equal(after.window(0, n), after.mask)
    assert after.window(n + 3, 1).all() and not image.window(n + 3, 1).any()
    assert torch.equal(after.window(n - 1, 2), torch.cat([after.mask[:, -1:], torch.ones(len(inputs), 1, dtype=torch.bool)], 1))
    assert not (after - after).window(n, 1).any() and (after | image).window(n, 1).all()


def test_random_tokens_are_seeded_and_size_matched(model_and_inputs):
    _, inputs = model_and_inputs
    obj = iv.object_tokens(inputs, [_box(image) for image in inputs.images])
    images = iv.image_tokens(inputs)
    first = iv.random_tokens(inputs, obj, seed=3)
    assert torch.equal(first.mask, iv.random_tokens(inputs, obj, seed=3).mask)
    assert any(not torch.equal(first.mask, iv.random_tokens(inputs, obj, seed=s).mask) for s in range(4, 8))
    assert torch.equal(first.count(), obj.count()) and not (first - images).mask.any()
    assert torch.equal(iv.random_tokens(inputs, 0.5).count(), (images.count().float() * 0.5).round().long())
    with pytest.raises(ValueError, match="only"):
        iv.random_tokens(inputs, int(images.count().max()) + 1)


def test_random_tokens_match_sizes_view_by_view(model_and_inputs):
    _, inputs = model_and_inputs
    obj = iv.object_tokens(inputs, [_box(image) for image in inputs.images], dilation=1)
    picked = iv.random_tokens(inputs, obj, seed=0, per_view=True)
    groups = iv.view_groups(inputs)
    for view in range(inputs.pixel_values.shape[0]):
        assert int((picked.mask & (groups == view)).sum()) == int((obj.mask & (groups == view)).sum())


def test_vision_patches_are_the_patches_each_image_token_reads(model_and_inputs):
    """The vision features (what the projector reads) that each image token of
    `hook_inputs_embeds` depends on — the non-zero rows of its gradient — are exactly the
    patches `vision_patches` maps it to."""
    model, inputs = model_and_inputs
    has_cls = model.cfg.feature_select_strategy == "full"  # the features then start with CLS
    seen: dict[str, torch.Tensor] = {}

    def leaf(x, hook):
        seen["features"] = x.detach().requires_grad_(True)
        return seen["features"]

    def stop(x, hook):
        seen["embeds"] = x
        raise _Stop

    with torch.enable_grad(), pytest.raises(_Stop):
        model.run_with_hooks(inputs, fwd_hooks=[("vision.hook_features", leaf), ("hook_inputs_embeds", stop)])
    layout = inputs.layout
    for k in range(len(layout)):
        row, position = int(layout.batch[k]), int(layout.position[k])
        (grad,) = torch.autograd.grad(seen["embeds"][row, position].sum(), seen["features"], retain_graph=True)
        patches = iv.vision_patches(model, inputs, iv.positions(inputs, {row: [position]})).mask
        assert torch.equal(patches if has_cls else patches[:, 1:], grad.abs().sum(-1) > 0), f"token {k}"


class _Stop(Exception):
    pass


def test_vision_patches_can_add_the_cls_of_touched_views(model_and_inputs):
    model, inputs = model_and_inputs
    obj = iv.object_tokens(inputs, [_box(inputs.images[0]), None], views="global")
    patches = iv.vision_patches(model, inputs, obj, include_cls=True).mask
    touched = patches[:, 1:].any(1)
    assert torch.equal(patches[:, 0], touched) and touched.sum() == 1
