"""Attention knockout equals Hugging Face with an additive attention mask written by hand — in the
language model and in the vision tower — and stays active on every generated token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import (
    additive_mask,
    assert_close,
    assert_same_generation,
    attention_masks,
    generate_without_cache,
    hf_logits,
    lm_attention_modules,
    load_hf,
    vision_attention_modules,
)

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv

CHECKPOINTS = ["llava_base", "llava_full", "internvl_6b", "internvl_300m"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def setup(request, tiny_checkpoint, photos):
    path = tiny_checkpoint(request.param)
    model = HookedVLM.from_pretrained(path)
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is the rocket? Answer briefly.", "Hi"])
    boxes = [(w * 0.3, h * 0.3, w * 0.65, h * 0.7) for w, h in (image.size for image in inputs.images)]
    return model, load_hf(path), inputs, boxes


def _lm_blocked(inputs, boxes, dilation=0):
    """[batch, 1, q, k]: from every real token after the image span to the object tokens,
    from the layout alone."""
    batch, n = inputs.input_ids.shape
    blocked = torch.zeros(batch, 1, n, n, dtype=torch.bool)
    for image, box in enumerate(boxes):
        row = inputs.layout.image_batch_row[image]
        last = int(inputs.layout.positions(image).max())
        keys = inputs.layout.box_to_positions(box, image, dilation=dilation)
        queries = torch.arange(last + 1, n)[inputs.attention_mask[row, last + 1 :].bool()]
        blocked[row, 0, queries[:, None], keys[None, :]] = True
    return blocked


def test_lm_knockout_in_every_layer_equals_hf_with_a_4d_mask(setup):
    model, hf, inputs, boxes = setup
    hooks = iv.attention_knockout(model, iv.after_image(inputs), iv.object_tokens(inputs, boxes, dilation=1))
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=hooks)
    mask = additive_mask(inputs, _lm_blocked(inputs, boxes, dilation=1))
    assert_close(ours, hf_logits(hf, inputs, attention_mask=mask))
    assert (ours - model(inputs)).abs().max() > 1e-3


def test_lm_knockout_in_chosen_layers_and_heads_equals_hf_with_per_layer_masks(setup):
    model, hf, inputs, boxes = setup
    layers, heads = [model.cfg.n_layers - 1], [0, model.cfg.n_heads - 1]
    hooks = iv.attention_knockout(model, iv.after_image(inputs), iv.object_tokens(inputs, boxes), layers=layers, heads=heads)
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=hooks)
    plain = additive_mask(inputs, torch.zeros(1, dtype=torch.bool))
    per_head = torch.zeros(1, model.cfg.n_heads, 1, 1, dtype=torch.bool)
    per_head[:, heads] = True
    knocked = additive_mask(inputs, _lm_blocked(inputs, boxes) & per_head)  # [batch, head, q, k]
    modules = lm_attention_modules(hf)
    with attention_masks({module: knocked if i in layers else plain for i, module in enumerate(modules)}), torch.no_grad():
        reference = hf_logits(hf, inputs, attention_mask=plain)
    assert_close(ours, reference)
    assert (ours - model(inputs)).abs().max() > 1e-4


def test_vision_knockout_equals_hf_vision_tower_with_masks(setup):
    """From every position of every view (CLS included) to the object's patches, in the vision
    tower's first layer: the HF towers get the same additive mask through `attention_mask`."""
    model, hf, inputs, boxes = setup
    obj = iv.object_tokens(inputs, boxes)
    source = iv.vision_patches(model, inputs, include_cls=True)
    target = iv.vision_patches(model, inputs, obj)
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=iv.attention_knockout(model, source, target, layers=0))
    # The patches under each object token, written from the layout and the tower's geometry
    n_views, n_pos = inputs.pixel_values.shape[0], model.cfg.vision.n_grid**2 + 1
    merge = 2 if model.cfg.family == "internvl" else 1
    keys = torch.zeros(n_views, n_pos, dtype=torch.bool)
    layout, offsets = inputs.layout, torch.tensor([0] + [len(v) for v in inputs.layout.views]).cumsum(0)
    for k in range(len(layout)):
        if obj.mask[layout.batch[k], layout.position[k]]:
            view = offsets[layout.image[k]] + layout.view[k]
            for dr in range(merge):
                for dc in range(merge):
                    r, c = layout.row[k] * merge + dr, layout.col[k] * merge + dc
                    keys[view, 1 + r * model.cfg.vision.n_grid + c] = True
    queries = torch.ones_like(keys)  # every patch and CLS of every view
    mask = torch.zeros(n_views, 1, n_pos, n_pos).masked_fill(queries[:, None, :, None] & keys[:, None, None, :], torch.finfo(torch.float32).min)
    with attention_masks({vision_attention_modules(hf)[0]: mask}), torch.no_grad():
        reference = hf_logits(hf, inputs)
    assert_close(ours, reference)
    assert (ours - model(inputs)).abs().max() > 1e-4


def test_knockout_stays_active_on_every_generated_token(setup):
    model, _, inputs, boxes = setup
    obj = iv.object_tokens(inputs, boxes, dilation=1)
    hooks = iv.attention_knockout(model, iv.after_image(inputs, include_generated=True), obj, layers=[0, 1])
    steps = 6
    cached = model.generate(inputs, max_new_tokens=steps, fwd_hooks=hooks, return_tokens=True)
    manual = generate_without_cache(model, inputs, steps, hooks)
    assert_same_generation(cached, manual, model.cfg.eos_token_ids)


def test_decoding_step_scores_are_blocked_from_the_generated_token(setup):
    """On a decoding step the one query sits at `past_length` and every key is in the cache."""
    model, _, inputs, boxes = setup
    obj = iv.object_tokens(inputs, boxes)
    seen = []
    hooks = iv.attention_knockout(model, iv.after_image(inputs), obj, layers=0)
    hooks.append(("blocks.0.attn.hook_attn_scores", lambda scores, hook: seen.append(scores.clone())))
    model.generate(inputs, max_new_tokens=3, fwd_hooks=hooks)
    minimum = torch.finfo(seen[0].dtype).min
    for step in seen[1:]:
        assert step.shape[2] == 1
        keys = obj.window(0, step.shape[-1])
        assert (step[:, :, 0][keys[:, None].expand_as(step[:, :, 0])] == minimum).all()


def test_layers_and_heads_may_be_numpy_or_torch_integers(setup):
    model, _, inputs, boxes = setup
    after, obj = iv.after_image(inputs), iv.object_tokens(inputs, boxes)
    with torch.no_grad(), iv.apply(model, iv.attention_knockout(model, after, obj, layers=[0, 1], heads=[0])):
        expected = model(inputs)
    for layers, heads in [(np.array([0, 1]), np.int64(0)), (torch.tensor([1, 0]), torch.tensor(0)), ([np.int32(0), 1], [np.int16(0)])]:
        with torch.no_grad(), iv.apply(model, iv.attention_knockout(model, after, obj, layers=layers, heads=heads)):
            assert torch.equal(model(inputs), expected)
    with pytest.raises(IndexError, match=f"^layer {model.cfg.n_layers} out of range"):
        iv.attention_knockout(model, after, obj, layers=np.int64(model.cfg.n_layers))
    with pytest.raises(TypeError, match="a layer must be an integer, got 0.5"):
        iv.attention_knockout(model, after, obj, layers=[0.5])
    with pytest.raises(TypeError, match="heads must be an integer or an iterable of integers"):
        iv.attention_knockout(model, after, obj, heads=1.0)


def test_bad_layers_heads_and_sets_are_clear_errors(setup):
    model, _, inputs, boxes = setup
    after, obj = iv.after_image(inputs), iv.object_tokens(inputs, boxes)
    with pytest.raises(IndexError, match=f"layer {model.cfg.n_layers} out of range"):
        iv.attention_knockout(model, after, obj, layers=[model.cfg.n_layers])
    with pytest.raises(IndexError, match="layer -1 out of range"):
        iv.attention_knockout(model, after, obj, layers=-1)
    with pytest.raises(IndexError, match=f"head {model.cfg.n_heads} out of range"):
        iv.attention_knockout(model, after, obj, heads=[model.cfg.n_heads])
    with pytest.raises(TypeError, match="both be TokenSets"):
        iv.attention_knockout(model, after, iv.vision_patches(model, inputs, obj))
    other = model.prepare(inputs.images[:1], ["Hi"])
    with pytest.raises(ValueError, match="batch rows"):
        model.run_with_hooks(other, fwd_hooks=iv.attention_knockout(model, after, obj, layers=0))
