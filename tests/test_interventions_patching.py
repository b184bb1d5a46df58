"""Activation patching equals the same edit written by hand, patching a run with itself changes
nothing, mismatched layouts are refused; head ablation removes a head's contribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import assert_close, assert_same_generation, generate_without_cache

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv

CHECKPOINTS = ["llava_base", "llava_multilayer", "internvl_6b", "internvl_300m"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def pair(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    size = photos["chelsea"].size
    prompts = ["Where is the cat? Answer briefly.", "Is there a cat?"]
    source = model.prepare([photos["chelsea"], photos["rocket"].resize(size)], prompts)
    base = model.prepare([photos["coffee"].resize(size), photos["astronaut"].resize(size)], prompts)
    return model, base, source


def _manual_z_patch(source_z, positions, heads):
    def patch(z, hook):
        z = z.clone()
        for h in heads:
            z[:, :, h][positions] = source_z[:, :, h][positions]
        return z

    return patch


def test_patching_heads_equals_a_manual_edit(pair):
    model, base, source = pair
    layer, heads = model.cfg.n_layers - 1, [0, model.cfg.n_heads - 1]
    name = f"blocks.{layer}.attn.hook_z"
    prompt = iv.after_image(base, include_generated=False)
    with torch.no_grad():
        ours = model.run_with_hooks(base, fwd_hooks=iv.activation_patch(model, base, source, name, positions=prompt, heads=heads))
        _, cache = model.run_with_cache(source, names_filter=name)
        manual = model.run_with_hooks(base, fwd_hooks=[(name, _manual_z_patch(cache[name], prompt.mask, heads))])
    assert_close(ours, manual, rel=1e-6)
    assert (ours - model(base)).abs().max() > 1e-4


def test_head_patch_over_layers_equals_a_manual_edit(pair):
    model, base, source = pair
    heads = [(0, 1), (model.cfg.n_layers - 1, 0), (0, 0)]
    with torch.no_grad():
        ours = model.run_with_hooks(base, fwd_hooks=iv.head_patch(model, base, source, heads))
        _, cache = model.run_with_cache(source, names_filter=lambda n: n.endswith("attn.hook_z"))
        everywhere = torch.ones(base.input_ids.shape, dtype=torch.bool)
        manual_hooks = [("blocks.0.attn.hook_z", _manual_z_patch(cache["blocks.0.attn.hook_z"], everywhere, [0, 1]))]
        last = f"blocks.{model.cfg.n_layers - 1}.attn.hook_z"
        manual_hooks.append((last, _manual_z_patch(cache[last], everywhere, [0])))
        manual = model.run_with_hooks(base, fwd_hooks=manual_hooks)
    assert_close(ours, manual, rel=1e-6)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("blocks.1.attn.hook_z", "heads"),
        ("blocks.0.attn.hook_result", "heads"),
        ("blocks.1.attn.hook_q", "heads"),
        ("blocks.0.attn.hook_attn_scores", "positions"),
        ("blocks.1.hook_resid_pre", "positions"),
        ("hook_inputs_embeds", "all"),
        ("vision.blocks.0.hook_resid_post", "patches"),
        ("projector.hook_out", "all"),
    ],
)
def test_patching_a_run_with_itself_changes_nothing(pair, name, kind):
    model, base, _ = pair
    kwargs = {
        "heads": dict(heads=[0, model.cfg.n_heads - 1], positions=iv.after_image(base, include_generated=False)),
        "positions": dict(positions=iv.image_tokens(base)),
        "patches": dict(positions=iv.vision_patches(model, base, include_cls=True)),
        "all": {},
    }[kind]
    model.set_attention_implementation("eager")  # the scores hook forces eager attention; compare like with like
    try:
        with torch.no_grad():
            clean = model(base)
            patched = model.run_with_hooks(base, fwd_hooks=iv.activation_patch(model, base, base, name, **kwargs))
    finally:
        model.set_attention_implementation("auto")
    assert_close(patched, clean, rel=1e-6)


def test_patching_from_a_cache_equals_patching_from_inputs(pair):
    model, base, source = pair
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_mid"]
    positions = iv.after_image(base, include_generated=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names_filter=names)
        from_cache = model.run_with_hooks(base, fwd_hooks=iv.activation_patch(model, base, cache, names, positions=positions, source_inputs=source))
        from_inputs = model.run_with_hooks(base, fwd_hooks=iv.activation_patch(model, base, source, names, positions=positions))
    assert torch.equal(from_cache, from_inputs)


def test_patching_stays_consistent_during_generation(pair):
    """The prompt positions are patched on the prefill; decoding steps, past the source's
    sequence, run unpatched — as in full forwards over the growing sequence."""
    model, base, source = pair
    hooks = iv.activation_patch(model, base, source, "blocks.0.hook_resid_post", positions=iv.after_image(base, include_generated=False))
    cached = model.generate(base, max_new_tokens=5, fwd_hooks=hooks, return_tokens=True)
    assert_same_generation(cached, generate_without_cache(model, base, 5, hooks), model.cfg.eos_token_ids)


def test_source_and_base_of_different_layouts_are_an_error(pair, photos):
    model, base, source = pair
    prompts = ["Where is the cat? Answer briefly.", "Is there a cat?"]
    other_size = model.prepare([photos["chelsea"], photos["grace_hopper_tall"]], prompts)
    with pytest.raises(ValueError, match="differ"):
        iv.activation_patch(model, base, other_size, "blocks.0.hook_resid_pre")
    other_prompt = model.prepare(source.images, ["Where is the cat?", "Is there a cat?"])
    with pytest.raises(ValueError, match="differ in shape"):
        iv.activation_patch(model, base, other_prompt, "blocks.0.hook_resid_pre")
    _, cache = model.run_with_cache(other_size, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="differ"):
        iv.activation_patch(model, base, cache, "blocks.0.hook_resid_pre", source_inputs=other_size)
    with pytest.raises(KeyError, match="blocks.1.hook_resid_pre"):
        iv.activation_patch(model, base, cache, "blocks.1.hook_resid_pre")


def test_bad_heads_and_position_types_are_clear_errors(pair):
    model, base, source = pair
    with pytest.raises(ValueError, match="no query-head axis"):
        iv.activation_patch(model, base, source, "blocks.0.attn.hook_k", heads=[0])
    with pytest.raises(IndexError, match=f"head {model.cfg.n_heads} out of range"):
        iv.activation_patch(model, base, source, "blocks.0.attn.hook_z", heads=[model.cfg.n_heads])
    with pytest.raises(IndexError, match=f"layer {model.cfg.n_layers} out of range"):
        iv.head_patch(model, base, source, [(model.cfg.n_layers, 0)])
    with pytest.raises(TypeError, match="PatchSet"):
        iv.activation_patch(model, base, source, "vision.blocks.0.hook_resid_pre", positions=iv.image_tokens(base))


# ---------------------------------------------------------------------------------- head ablation
def test_zero_head_ablation_removes_the_heads_contribution(pair):
    model, base, _ = pair
    layer, head = model.cfg.n_layers - 1, model.cfg.n_heads - 1
    names = [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.attn.hook_result"]
    with torch.no_grad():
        _, clean = model.run_with_cache(base, names_filter=names)
        with iv.apply(model, iv.head_ablation(model, [(layer, head)])):
            _, ablated = model.run_with_cache(base, names_filter=names[0])
    expected = clean[names[0]] - clean[names[1]][:, :, head]
    assert_close(ablated[names[0]], expected)


def test_mean_head_ablation_writes_the_reference_mean(pair):
    model, base, source = pair
    heads = [(0, 0), (model.cfg.n_layers - 1, 1)]
    name0 = "blocks.0.attn.hook_z"
    with torch.no_grad():
        _, reference = model.run_with_cache(source, names_filter=name0)
        mean = reference[name0][source.attention_mask.bool()].mean(0)  # [head, d_head]
        with iv.apply(model, iv.head_ablation(model, heads, "mean", reference=source)):
            _, ablated = model.run_with_cache(base, names_filter=name0)
    assert_close(ablated[name0][:, :, 0], mean[0].expand_as(ablated[name0][:, :, 0]))
    means = iv.mean_head_activations(model, [source, base], layers=[0])
    assert means[0].shape == (model.cfg.n_heads, model.cfg.d_head)


def test_head_ablation_stays_active_on_every_generated_token(pair):
    model, base, _ = pair
    hooks = iv.head_ablation(model, [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads - 1)])
    cached = model.generate(base, max_new_tokens=5, fwd_hooks=hooks, return_tokens=True)
    assert_same_generation(cached, generate_without_cache(model, base, 5, hooks), model.cfg.eos_token_ids)


def test_head_ablation_out_of_range_is_an_error(pair):
    model, _, _ = pair
    with pytest.raises(IndexError, match=f"layer {model.cfg.n_layers} out of range"):
        iv.head_ablation(model, [(model.cfg.n_layers, 0)])
    with pytest.raises(IndexError, match=f"head {model.cfg.n_heads} out of range: layer 0"):
        iv.head_ablation(model, [(0, model.cfg.n_heads)])
    with pytest.raises(ValueError, match="reference"):
        iv.head_ablation(model, [(0, 0)], "mean")


def test_head_ablation_takes_numpy_and_torch_integers(pair):
    model, base, _ = pair
    layer = model.cfg.n_layers - 1
    with torch.no_grad(), iv.apply(model, iv.head_ablation(model, [(layer, 1), (0, 0)])):
        expected = model(base)
    for heads in ([(np.int64(layer), np.int32(1)), (0, 0)], np.array([[layer, 1], [0, 0]]), torch.tensor([[layer, 1], [0, 0]])):
        hooks = iv.head_ablation(model, heads)
        assert [name for name, _ in hooks] == ["blocks.0.attn.hook_z", f"blocks.{layer}.attn.hook_z"]
        with torch.no_grad(), iv.apply(model, hooks):
            assert torch.equal(model(base), expected)


def test_head_ablation_names_the_mistake_in_bad_heads(pair):
    model, _, _ = pair
    with pytest.raises(TypeError, match=r"\(layer, head\) pairs expected, got 1"):
        iv.head_ablation(model, [1, 2])
    with pytest.raises(TypeError, match=r"\(layer, head\) pairs expected"):
        iv.head_ablation(model, 3)
    with pytest.raises(TypeError, match="a layer must be an integer, got 0.0"):
        iv.head_ablation(model, [(0.0, 1)])
    with pytest.raises(TypeError, match="a head must be an integer, got '1'"):
        iv.head_ablation(model, [(0, "1")])
    with pytest.raises(IndexError, match=f"^layer {model.cfg.n_layers} out of range"):  # not "np.int64(...)"
        iv.head_ablation(model, [(np.int64(model.cfg.n_layers), 0)])


# ---------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("name", ["llava_base", "internvl_6b"])
def test_interventions_define_the_base_condition_of_a_head_sweep(name, tiny_checkpoint, photos):
    """Builders work as `fwd_hooks` of `head_patching_sweep`, whose batched copies share a
    one-row token set and whose suffix runs start at `past_length` > 0."""
    from hooked_vlm.patching import answer_nll_metric, head_patching_sweep, naive_head_patching

    model = HookedVLM.from_pretrained(tiny_checkpoint(name))
    size = photos["chelsea"].size
    answer = "[0.12, 0.30, 0.55, 0.91]"
    base = model.prepare(photos["coffee"].resize(size), "Where is the cat?", answers=answer)
    source = model.prepare(photos["chelsea"], "Where is the cat?", answers=answer)
    obj = iv.object_tokens(base, (size[0] * 0.3, size[1] * 0.3, size[0] * 0.6, size[1] * 0.6))
    hooks = iv.attention_knockout(model, iv.after_image(base), obj) + iv.token_ablation(model, obj, "zero")
    prompt = (iv.after_image(base, include_generated=False) - iv.answer_tokens(base)).positions(0)
    metric = answer_nll_metric(base)
    fast = head_patching_sweep(model, base, source, metric, prompt, fwd_hooks=hooks, batch_size=3)
    slow = naive_head_patching(model, base, source, metric, prompt, fwd_hooks=hooks)
    assert_close(fast, slow)
