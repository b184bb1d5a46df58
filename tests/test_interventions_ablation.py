"""Token ablation equals editing Hugging Face's `inputs_embeds` by hand, stays active on every
generated token, and mean vectors round-trip through a file that refuses the wrong model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import assert_close, assert_same_generation, generate_without_cache, hf_inputs_embeds, hf_logits, load_hf

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv

CHECKPOINTS = ["llava_base", "llava_full", "internvl_6b", "internvl_300m"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def setup(request, tiny_checkpoint, photos):
    path = tiny_checkpoint(request.param)
    model = HookedVLM.from_pretrained(path)
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is the rocket? Answer briefly.", "Hi"])
    boxes = [(w * 0.3, h * 0.3, w * 0.65, h * 0.7) for w, h in (image.size for image in inputs.images)]
    return model, path, inputs, boxes


def _vector(model, seed=0):
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("value", ["mean", "zero"])
def test_ablation_equals_editing_hf_inputs_embeds(setup, value):
    model, path, inputs, boxes = setup
    hf = load_hf(path)
    vector = _vector(model) if value == "mean" else torch.zeros(model.cfg.d_model)
    tokens = iv.object_tokens(inputs, boxes, dilation=1)
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=iv.token_ablation(model, tokens, vector if value == "mean" else "zero"))
    embeds = hf_inputs_embeds(hf, inputs).clone()
    for image, box in enumerate(boxes):  # the same edit, written from the layout alone
        embeds[inputs.layout.image_batch_row[image], inputs.layout.box_to_positions(box, image, dilation=1)] = vector
    assert_close(ours, hf_logits(hf, inputs, inputs_embeds=embeds))
    assert (ours - model(inputs)).abs().max() > 1e-3  # the ablation did something


def test_ablation_of_one_view_kind_only_touches_it(setup):
    model, _, inputs, boxes = setup
    tokens = iv.object_tokens(inputs, boxes, views="global")
    with iv.apply(model, iv.token_ablation(model, tokens, "zero")):
        _, cache = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")
    embeds = cache["hook_inputs_embeds"]
    assert (embeds[tokens.mask] == 0).all()
    assert (embeds[~tokens.mask] != 0).any(-1).all()


def test_noise_is_seeded_per_token_and_only_at_the_set(setup):
    model, _, inputs, boxes = setup
    tokens = iv.object_tokens(inputs, boxes)

    def embeds(seed):
        with iv.apply(model, iv.token_ablation(model, tokens, "noise", noise_std=2.0, seed=seed)):
            _, cache = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")
        return cache["hook_inputs_embeds"]

    clean = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")[1]["hook_inputs_embeds"]
    first = embeds(1)
    assert torch.equal(first, embeds(1)) and not torch.equal(first[tokens.mask], embeds(2)[tokens.mask])
    assert torch.equal(first[~tokens.mask], clean[~tokens.mask])
    assert 1.5 < first[tokens.mask].std().item() < 2.5


def test_noise_of_a_sample_is_the_same_alone_or_in_any_batch(setup, photos):
    """Seeded per row and counted from the row's first real token: left padding and the row
    index do not change a sample's noise."""
    model = setup[0]
    alone = model.prepare([photos["chelsea"]], ["Hi"])
    batch = model.prepare(
        [photos["rocket"], photos["astronaut"], photos["chelsea"]], ["Where is the rocket? Answer briefly.", "Describe it.", "Hi"]
    )
    assert (batch.attention_mask[2] == 0).any()  # row 2 is left-padded, the lone sample is not

    def noise(inputs, seeds, row):
        tokens = iv.image_tokens(inputs)
        with iv.apply(model, iv.token_ablation(model, tokens, "noise", seed=seeds, inputs=inputs)):
            _, cache = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")
        return cache["hook_inputs_embeds"][row, tokens.mask[row]]

    in_batch = noise(batch, [11, 12, 7], 2)
    assert torch.equal(in_batch, noise(alone, [7], 0))
    assert torch.equal(in_batch, noise(alone, 7, 0))  # one int seeds every row
    assert not torch.equal(in_batch, noise(alone, [8], 0))
    with pytest.raises(ValueError, match="2 noise seeds given for a token set of 3 batch rows"):
        iv.token_ablation(model, iv.image_tokens(batch), "noise", seed=[1, 2], inputs=batch)
    assert torch.equal(in_batch, noise(batch, np.array([11, 12, 7]), 2))  # any integers, as layers and heads
    with pytest.raises(TypeError, match="seeds must be an integer or an iterable of integers, got True"):
        iv.token_ablation(model, iv.image_tokens(batch), "noise", seed=True, inputs=batch)


def test_ablation_stays_active_on_every_generated_token(setup):
    """Image tokens ablated at the input, and every generated token ablated at a later hook:
    a KV-cached `generate` (run twice, so no state leaks) equals full forwards without a cache."""
    model, _, inputs, boxes = setup
    hooks = iv.token_ablation(model, iv.object_tokens(inputs, boxes), _vector(model)) + iv.token_ablation(
        model, iv.after_image(inputs, include_generated=True), "noise", hook="blocks.0.hook_resid_post", noise_std=3.0
    )
    steps = 6
    cached = model.generate(inputs, max_new_tokens=steps, fwd_hooks=hooks, return_tokens=True)
    again = model.generate(inputs, max_new_tokens=steps, fwd_hooks=hooks, return_tokens=True)
    manual = generate_without_cache(model, inputs, steps, hooks)
    assert torch.equal(cached, again)
    assert_same_generation(cached, manual, model.cfg.eos_token_ids)
    assert not torch.equal(cached, model.generate(inputs, max_new_tokens=steps, return_tokens=True))


def test_ablation_at_a_head_hook_takes_a_vector_per_head(setup):
    model, _, inputs, boxes = setup
    tokens = iv.object_tokens(inputs, boxes)
    value = torch.randn(model.cfg.n_heads, model.cfg.d_head)
    with iv.apply(model, iv.token_ablation(model, tokens, value, hook="blocks.1.attn.hook_z")):
        _, cache = model.run_with_cache(inputs, names_filter="blocks.1.attn.hook_z")
    assert torch.equal(cache["blocks.1.attn.hook_z"][tokens.mask], value.expand(int(tokens.mask.sum()), -1, -1))
    with pytest.raises(ValueError, match=r"shape \(7,\) but blocks.1.attn.hook_z carries"):
        model.run_with_hooks(inputs, fwd_hooks=iv.token_ablation(model, tokens, torch.zeros(7), hook="blocks.1.attn.hook_z"))
    with pytest.raises(ValueError, match="no language-model position axis"):
        iv.token_ablation(model, tokens, hook="vision.blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown hook name"):
        iv.token_ablation(model, tokens, hook="hook_input_embeds")


def test_mean_embedding_is_the_average_over_image_tokens(setup, photos, tmp_path):
    model, _, _, _ = setup
    images = [photos["rocket"], photos["astronaut"], photos["coffee"]]
    mean = iv.compute_mean_embedding(model, images, views="global", batch_size=2, progress=False)
    rows = []
    for image in images:
        inputs = model.prepare(image, "Describe the image.")
        _, cache = model.run_with_cache(inputs, names_filter="hook_inputs_embeds")
        rows.append(cache["hook_inputs_embeds"][0, inputs.layout.positions(0, "global")])
    rows = torch.cat(rows)
    assert mean.count == rows.shape[0] and mean.hook == "hook_inputs_embeds" and mean.views == "global"
    assert_close(mean.vector, rows.double().mean(0).float())

    loaded = iv.load_mean(iv.save_mean(mean, tmp_path / "mean.pt"), model)
    assert torch.equal(loaded.vector, mean.vector) and loaded.count == mean.count and loaded.fingerprint == mean.fingerprint


def test_loading_a_mean_onto_another_model(setup, tiny_checkpoint, tmp_path):
    model, _, inputs, boxes = setup
    mean = iv.MeanEmbedding(torch.zeros(model.cfg.d_model + 8), "hook_inputs_embeds", 10, "all", "x", "another model")
    path = iv.save_mean(mean, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="carries"):
        iv.load_mean(path, model)
    other = iv.MeanEmbedding(torch.zeros(model.cfg.d_model), "hook_inputs_embeds", 10, "all", "x", "another model")
    with pytest.warns(UserWarning, match="another model"):
        iv.load_mean(iv.save_mean(other, tmp_path / "other.pt"), model)
