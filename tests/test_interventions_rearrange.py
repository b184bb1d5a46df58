"""Shuffles and object extension: seeded, moving only the chosen tokens, within their views;
the `apply` context manager removes every hook, also on errors."""

from __future__ import annotations

import pytest
import torch
from hf_reference import assert_same_generation, generate_without_cache

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv

CHECKPOINTS = ["llava_base", "internvl_6b"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def setup(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is the rocket? Answer briefly.", "Hi"])
    boxes = [(w * 0.3, h * 0.3, w * 0.65, h * 0.7) for w, h in (image.size for image in inputs.images)]
    return model, inputs, boxes


def _embeds(model, inputs, hooks=()):
    with torch.no_grad(), iv.apply(model, list(hooks)):
        _, cache = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")
    return cache["hook_inputs_embeds"]


def _source_positions(clean, edited, mask):
    """For each edited position, the position of `clean` whose vector it now holds."""
    out = {}
    for row, pos in mask.nonzero().tolist():
        matches = (clean[row] == edited[row, pos]).all(-1).nonzero().flatten().tolist()
        assert len(matches) == 1, "an edited token is not a copy of exactly one original token"
        out[(row, pos)] = matches[0]
    return out


def test_full_shuffle_permutes_each_view_among_itself(setup):
    model, inputs, _ = setup
    clean = _embeds(model, inputs)
    images = iv.image_tokens(inputs)
    shuffled = _embeds(model, inputs, iv.token_shuffle(model, inputs, seed=0))
    assert torch.equal(shuffled[~images.mask], clean[~images.mask])
    moves = _source_positions(clean, shuffled, images.mask)
    groups = iv.view_groups(inputs)
    assert all(groups[row, pos] == groups[row, src] for (row, pos), src in moves.items())
    for row in range(len(inputs)):  # a permutation: every image token is read exactly once
        assert sorted(src for (r, _), src in moves.items() if r == row) == images.positions(row).tolist()
    assert any(pos != src for (_, pos), src in moves.items())


def test_shuffle_is_deterministic_given_the_seed(setup):
    model, inputs, _ = setup
    first = _embeds(model, inputs, iv.token_shuffle(model, inputs, seed=5))
    assert torch.equal(first, _embeds(model, inputs, iv.token_shuffle(model, inputs, seed=5)))
    assert not torch.equal(first, _embeds(model, inputs, iv.token_shuffle(model, inputs, seed=6)))


def test_shuffle_inside_the_object_moves_only_object_tokens(setup):
    model, inputs, boxes = setup
    obj = iv.object_tokens(inputs, boxes, dilation=1)
    clean = _embeds(model, inputs)
    shuffled = _embeds(model, inputs, iv.token_shuffle(model, inputs, obj, seed=1))
    assert torch.equal(shuffled[~obj.mask], clean[~obj.mask])
    moves = _source_positions(clean, shuffled, obj.mask)
    assert all(obj.mask[row, src] for (row, _), src in moves.items())
    assert not torch.equal(shuffled, clean)


def _small_boxes(inputs):
    """Per image, a box over the first two tokens of its first view: a ring around it exists."""
    layout, boxes = inputs.layout, []
    for image in range(layout.n_images):
        first_row = layout.grid(image, 0)[0, :2]
        corners = layout.box[torch.isin(layout.position, first_row) & (layout.image == image)]
        boxes.append((corners[:, 0].min().item() + 1, corners[:, 1].min().item() + 1, corners[:, 2].max().item() - 1, corners[:, 3].max().item() - 1))
    return boxes


def test_object_extension_fills_the_ring_with_copies_of_the_object(setup):
    model, inputs, _ = setup
    boxes = _small_boxes(inputs)
    inside = iv.object_tokens(inputs, boxes)
    ring = iv.object_tokens(inputs, boxes, dilation=2) - inside
    clean = _embeds(model, inputs)
    hooks = iv.object_extension(model, inputs, boxes, rings=2, seed=3)
    extended = _embeds(model, inputs, hooks)
    assert ring.mask.any()
    assert torch.equal(extended[~ring.mask], clean[~ring.mask])
    # copies come from the object's tokens of the same view; InternVL's local tiles of an image
    # count as one view (one grid, as for dilation), so a ring crossing a seam is filled too
    groups = iv.view_groups(inputs)
    groups[inputs.layout.batch, inputs.layout.position] = inputs.layout.sheet_index()
    for (row, pos), src in _source_positions(clean, extended, ring.mask).items():
        assert inside.mask[row, src] and groups[row, src] == groups[row, pos]
    assert torch.equal(extended, _embeds(model, inputs, iv.object_extension(model, inputs, boxes, rings=2, seed=3)))
    assert not torch.equal(extended, _embeds(model, inputs, iv.object_extension(model, inputs, boxes, rings=2, seed=4)))


def test_rearrangements_survive_generation(setup):
    model, inputs, boxes = setup
    hooks = iv.token_shuffle(model, inputs, seed=2) + iv.object_extension(model, inputs, boxes, rings=1, hook="blocks.0.hook_resid_post")
    cached = model.generate(inputs, max_new_tokens=5, fwd_hooks=hooks, return_tokens=True)
    assert_same_generation(cached, generate_without_cache(model, inputs, 5, hooks), model.cfg.eos_token_ids)


def test_rearrangement_errors(setup):
    model, inputs, boxes = setup
    with pytest.raises(ValueError, match="generated tokens"):
        iv.token_shuffle(model, inputs, iv.after_image(inputs))
    with pytest.raises(ValueError, match="nothing to copy from"):
        iv.copy_tokens(model, inputs, iv.object_tokens(inputs, [boxes[0], None]), iv.image_tokens(inputs))
    with pytest.raises(ValueError, match="rings"):
        iv.object_extension(model, inputs, boxes, rings=0)


def test_apply_removes_every_hook_even_when_the_block_raises(setup):
    model, inputs, boxes = setup
    obj = iv.object_tokens(inputs, boxes)
    with pytest.raises(RuntimeError, match="boom"), iv.apply(
        model, iv.token_ablation(model, obj), iv.attention_knockout(model, iv.after_image(inputs), obj), iv.token_shuffle(model, inputs)
    ):
        assert any(hp.fwd_hooks for hp in model.hook_dict.values())
        raise RuntimeError("boom")
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
