"""Hooks: every one is causal, caches are transformer_lens ActivationCaches whose helpers
reconstruct the residual stream, hook_result is free unless used, and hooks stay active
during generation."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import ActivationCache

from hooked_vlm import HookedVLM
from hooked_vlm.components.attention import Attention

# Hooks that cannot affect the logits by construction, with the reason. None so far: the towers
# only build the blocks whose output is read, and every hook covers whole tensors.
NOT_CAUSAL: dict[str, str] = {}

CHECKPOINTS = ["llava_base", "llava_multilayer", "llava_full", "internvl_300m", "internvl_6b", "internvl_moe", "internvl_moe_top1"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def model_and_inputs(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    inputs = model.prepare([photos["rocket"], photos["astronaut"]], ["Where is the rocket?", "Describe this photo in detail please."])
    return model, inputs


def _perturb(tensor: torch.Tensor, hook) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor)
    return tensor + noise * (tensor.float().std().item() + 1e-2)


def test_every_hook_is_causal(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        clean = model(inputs)
        inert = []
        for name in model.hook_dict:
            patched = model.run_with_hooks(inputs, fwd_hooks=[(name, _perturb)])
            if torch.equal(patched, clean):
                inert.append(name)
    assert inert == sorted(NOT_CAUSAL), f"hooks whose edits do not reach the logits: {inert}"


def test_hooks_are_removed_after_the_call_even_when_it_raises(model_and_inputs):
    model, inputs = model_and_inputs

    def explode(tensor, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_pre", explode)])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda t: t[:, :-1], ValueError, r"returned shape \(\d+, \d+, \d+\); expected"),
        (lambda t: t.double(), ValueError, r"returned dtype torch.float64; expected torch.float32"),
        (lambda t: t.to("meta"), ValueError, r"returned device meta; expected cpu"),
        (lambda t: 3, TypeError, r"returned a value of type int; a forward hook returns None or a tensor"),
    ],
    ids=["shape", "dtype", "device", "not a tensor"],
)
def test_hook_returning_something_unlike_its_input_raises(model_and_inputs, edit, error, message):
    model, inputs = model_and_inputs
    with pytest.raises(error, match=r"hook on blocks.0.hook_resid_mid " + message):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mid", lambda t, hook: edit(t))])
    # the same check on hooks added one by one (TransformerLens's `add_hook`)
    model.add_hook("blocks.0.hook_resid_mid", lambda t, hook: edit(t))
    try:
        with pytest.raises(error, match=r"hook on blocks.0.hook_resid_mid " + message):
            model(inputs)
    finally:
        model.reset_hooks(including_permanent=True)


def test_add_hook_checks_the_name(model_and_inputs):
    model, _ = model_and_inputs
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.0.hook_resid_mdi'; did you mean"):
        model.add_hook("blocks.0.hook_resid_mdi", lambda t, hook: None)


def test_hook_returning_none_or_editing_in_place_is_fine(model_and_inputs):
    model, inputs = model_and_inputs

    def double_in_place(tensor, hook):
        tensor.mul_(2.0)

    with torch.no_grad():
        clean = model(inputs)
        same = model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mid", lambda t, hook: None)])
        edited = model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mid", double_in_place)])
    assert torch.equal(same, clean) and not torch.equal(edited, clean)


def test_unknown_hook_name_raises_with_suggestions(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.0.hook_resid_mdi'.*blocks.0.hook_resid_mid"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mdi", lambda t, hook: t)])


def test_run_with_cache_returns_activation_cache_with_every_hook(model_and_inputs):
    model, inputs = model_and_inputs
    model.set_attention_implementation("eager")
    try:
        logits, cache = model.run_with_cache(inputs)
        plain = model(inputs)
    finally:
        model.set_attention_implementation("auto")
    assert isinstance(cache, ActivationCache)
    assert set(cache.keys()) == set(model.hook_dict)
    assert torch.equal(logits, plain)  # caching (hook_result included) does not change the numbers


def test_decompose_resid_sums_to_the_residual_stream(model_and_inputs):
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n else (False,):
            parts, labels = cache.decompose_resid(layer=layer, mlp_input=mlp_input, return_labels=True)
            target = cache[f"blocks.{n - 1}.hook_resid_post"] if layer == n else cache[f"blocks.{layer}.hook_resid_{'mid' if mlp_input else 'pre'}"]
            assert labels[0] == "inputs_embeds"
            _assert_close(parts.sum(0), target)


def test_stack_head_results_sum_to_attention_outputs(model_and_inputs):
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    n, h = model.cfg.n_layers, model.cfg.n_heads
    stack, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert stack.shape[0] == n * h and labels[0] == "L0H0"
    for layer in range(n):
        heads = stack[layer * h : (layer + 1) * h].sum(0) + model.blocks[layer].attn.b_O
        _assert_close(heads, cache[f"blocks.{layer}.hook_attn_out"])
    total = cache.stack_head_results(layer=-1, incl_remainder=True).sum(0)
    _assert_close(total, cache[f"blocks.{n - 1}.hook_resid_post"])


def test_accumulated_resid_is_the_residual_stream_at_each_layer(model_and_inputs):
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    for layer in range(n):
        assert torch.equal(stack[layer], cache[f"blocks.{layer}.hook_resid_pre"])
    normed = cache.accumulated_resid(apply_ln=True)
    _assert_close(normed[-1], cache["ln_final.hook_normalized"])  # logit lens at the last layer = the model




def test_full_resid_decomposition_sums_to_the_residual_stream_at_image_tokens_too(model_and_inputs):
    """TransformerLens's heads + MLP outputs (or neurons) + embeddings + biases, whose embedding term
    is `hook_inputs_embeds`: `hook_embed` holds no image features."""
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    parts, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert "inputs_embeds" in labels
    _assert_close(parts.sum(0), final, atol=1e-4)  # a sum of ~20 terms of ~100
    image = int(inputs.layout.position[0])  # an image token of row 0; neurons make a large stack
    if model.cfg.num_experts:  # a mixture of experts has no single set of neurons to expand
        with pytest.raises(ValueError, match="expand_neurons=False"):
            cache.get_full_resid_decomposition(pos_slice=image)
    else:
        _assert_close(cache.get_full_resid_decomposition(pos_slice=image).sum(0), final[:, image], atol=1e-4)
    assert torch.equal(cache["hook_embed"], cache.cache_dict["hook_embed"])  # the cache is left as it was

def test_stacks_with_the_norm_applied_sum_to_the_norms_output(model_and_inputs):
    """`apply_ln=True` applies the norm as the model does, its weight included (nothing is folded),
    so the stacks compose with the raw W_Q, W_in, W_U as ln1, ln2 and ln_final's outputs do."""
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n else (False,):
            parts = cache.decompose_resid(layer=layer, mlp_input=mlp_input, apply_ln=True)
            target = "ln_final.hook_normalized" if layer == n else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_normalized"
            _assert_close(parts.sum(0), cache[target])
    heads = cache.stack_head_results(layer=1, incl_remainder=True, apply_ln=True)
    _assert_close(heads.sum(0), cache["blocks.1.ln1.hook_normalized"])
    directions = model.W_U[:, :3]  # TransformerLens projects neurons through its own shortcut
    projected = cache.stack_neuron_results(layer=n, apply_ln=True, project_output_onto=directions, pos_slice=-1)
    _assert_close(projected, cache.stack_neuron_results(layer=n, apply_ln=True, pos_slice=-1) @ directions, atol=1e-4)


def test_logit_lens_over_the_accumulated_residual_stream_reads_the_token_directions(model_and_inputs):
    """TransformerLens's logit lens: `accumulated_resid(apply_ln=True) @ tokens_to_residual_directions`
    is the logit each layer's residual stream would give through the final norm and unembedding."""
    model, inputs = model_and_inputs
    logits, cache = model.run_with_cache(inputs)
    token = int(logits[0, -1].argmax())
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1) @ model.tokens_to_residual_directions(token)  # [layer, batch]
    assert torch.allclose(lens[-1, 0], logits[0, -1, token] - model.b_U[token], atol=1e-4)
    with torch.no_grad():
        by_hand = model.ln_final(cache["blocks.1.hook_resid_pre"][:, -1]) @ model.W_U[:, token]
    assert torch.allclose(lens[1], by_hand, atol=1e-4)

def test_hook_result_is_not_computed_unless_used(model_and_inputs, monkeypatch):
    model, inputs = model_and_inputs

    def forbidden(self):
        raise AssertionError("W_O was read: hook_result computed without a consumer")

    monkeypatch.setattr(Attention, "W_O", property(forbidden))
    model(inputs)
    model.run_with_cache(inputs, names_filter=lambda name: "hook_result" not in name)
    with pytest.raises(AssertionError, match="W_O was read"):
        model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_result")


def test_weight_views_reproduce_the_hooked_projections(model_and_inputs):
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs)
    for prefix, attn in (("vision.blocks.0", model.vision.blocks[0].attn), ("blocks.0", model.blocks[0].attn)):
        cfg = attn.cfg
        x = cache[f"{prefix}.ln1.hook_normalized"]
        assert attn.W_Q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
        assert attn.W_K.shape == attn.W_V.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
        assert attn.W_O.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
        q = torch.einsum("bpm,hmd->bphd", x, attn.W_Q) + attn.b_Q
        _assert_close(q, cache[f"{prefix}.attn.hook_q"])
        v = torch.einsum("bpm,hmd->bphd", x, attn.W_V) + attn.b_V
        _assert_close(v[:, :, :: attn.n_rep], cache[f"{prefix}.attn.hook_v"])
        result = torch.einsum("bphd,hdm->bphm", cache[f"{prefix}.attn.hook_z"], attn.W_O)
        _assert_close(result, cache[f"{prefix}.attn.hook_result"])
    assert model.W_Q.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head)


def test_generate_applies_hooks_on_prefill_and_every_step(model_and_inputs):
    """A hook that edits an activation changes generation exactly as the same edit does in a
    loop of full forwards without a KV cache."""
    model, inputs = model_and_inputs
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    hook = ("blocks.0.hook_resid_post", lambda t, hook: t + 3 * direction.to(t))
    steps = 8
    edited = model.generate(inputs, max_new_tokens=steps, fwd_hooks=[hook], return_tokens=True)
    plain = model.generate(inputs, max_new_tokens=steps, return_tokens=True)
    assert not torch.equal(edited, plain)

    ids, mask = inputs.input_ids, inputs.attention_mask
    manual = []
    for _ in range(steps):
        step_inputs = _extend(inputs, ids, mask)
        with torch.no_grad():
            logits = model.run_with_hooks(step_inputs, fwd_hooks=[hook])
        token = logits[:, -1].argmax(-1)
        manual.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    manual = torch.stack(manual, dim=1)
    eos = torch.tensor(model.cfg.eos_token_ids)
    for row_edited, row_manual in zip(edited, manual):
        stop = next((i + 1 for i, t in enumerate(row_manual) if t in eos), steps)
        assert torch.equal(row_edited[:stop], row_manual[:stop])


def _extend(inputs, ids, mask):
    from dataclasses import replace

    from hooked_vlm.inputs import position_ids_from_mask

    return replace(inputs, input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """Within 1e-5, absolute (activations of the random fixtures reach ~100)."""
    assert (actual - expected).abs().max().item() <= atol


def test_hook_result_edits_reach_the_output_whether_returned_or_in_place(model_and_inputs):
    model, inputs = model_and_inputs
    name = "blocks.0.attn.hook_result"
    _, cache = model.run_with_cache(inputs, names_filter=[name, "blocks.0.hook_attn_out"])
    expected = cache["blocks.0.hook_attn_out"] - cache[name][:, :, 0]  # without head 0

    def returned(result, hook):
        result = result.clone()
        result[:, :, 0] = 0
        return result

    def in_place(result, hook):
        result[:, :, 0] = 0

    for edit in (returned, in_place):
        with model.hooks(fwd_hooks=[(name, edit)]):
            _, edited = model.run_with_cache(inputs, names_filter="blocks.0.hook_attn_out")
        _assert_close(edited["blocks.0.hook_attn_out"], expected)


def test_backward_hooks_on_hook_result_fire(model_and_inputs):
    model, inputs = model_and_inputs
    grads = []
    embed_leaf = ("hook_embed", lambda x, hook: x.detach().requires_grad_(True))
    model.add_hook("blocks.0.attn.hook_result", lambda grad, hook: grads.append(grad), dir="bwd")
    try:
        with torch.enable_grad():
            logits = model.run_with_hooks(inputs, fwd_hooks=[embed_leaf])
            logits[:, -1].sum().backward()
    finally:
        model.reset_hooks(including_permanent=True)
    assert grads and grads[0].shape[-2:] == (model.cfg.n_heads, model.cfg.d_model)


def test_pos_slice_cuts_the_position_axis_of_every_hook(model_and_inputs):
    """Per-head hooks ([batch, pos, head, d], rotary and q/k-norm outputs included) are cut on
    their position axis, everything else on the second from last; the slice is a copy."""
    model, inputs = model_and_inputs
    _, full = model.run_with_cache(inputs)
    _, last = model.run_with_cache(inputs, pos_slice=-1)
    for name, tensor in full.items():
        per_head = tensor.dim() == 4 and not name.endswith(("hook_pattern", "hook_attn_scores"))
        dim = -3 if per_head else -2
        expected = tensor.narrow(dim, tensor.shape[dim] - 1, 1) if tensor.dim() >= -dim else tensor
        assert torch.equal(last[name], expected), name
        if last[name].numel() < tensor.numel():
            assert last[name].untyped_storage().nbytes() < tensor.untyped_storage().nbytes(), name  # not a view


def test_a_typo_in_a_names_filter_is_an_error(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.0.hook_resid_pr'"):
        model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pr")
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.0.hook_attn_ot'"):
        model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_pre", "blocks.0.hook_attn_ot"])


def test_cache_options_that_cannot_work_say_why(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="incl_bwd needs a scalar output"):
        model.run_with_cache(inputs, incl_bwd=True)
    with pytest.raises(ValueError, match="remove_batch_dim needs a batch of 1, got 2"):
        model.run_with_cache(inputs, remove_batch_dim=True)


def test_logit_attributions_of_the_decomposed_residual_stream_sum_to_the_logit(model_and_inputs):
    """`cache.logit_attrs` (TransformerLens's, which applies the final norm's scale itself) over
    `decompose_resid`: the parts sum to the token's logit at the last position."""
    model, inputs = model_and_inputs
    logits, cache = model.run_with_cache(inputs)
    token = int(logits[0, -1].argmax())
    parts = cache.decompose_resid(layer=-1, pos_slice=-1)  # [component, batch, d_model]
    attrs = cache.logit_attrs(parts, tokens=torch.tensor([token] * len(inputs)), pos_slice=-1)  # [component, batch]
    assert torch.allclose(attrs.sum(0)[0], logits[0, -1, token] - model.b_U[token], atol=1e-4)
    assert torch.equal(model.tokens_to_residual_directions(token), model.W_U[:, token])  # TransformerLens's
    assert torch.equal(model.accumulated_bias(model.cfg.n_layers), torch.zeros(model.cfg.text.d_model))


def test_generate_leaves_no_position_offset_behind_even_when_it_raises(model_and_inputs):
    """Position-addressed hooks read `model.past_length`; after `generate` (finished or not) a
    direct call of `embed_inputs` must see the prompt's positions again."""
    from hooked_vlm import interventions as iv

    model, inputs = model_and_inputs
    ablate = iv.token_ablation(model, iv.image_tokens(inputs), "zero")

    def embeds():
        with iv.apply(model, ablate):
            return model.embed_inputs(inputs.input_ids, model.encode_images(inputs.pixel_values), inputs.image_token_mask())

    with torch.no_grad():
        before = embeds()
        model.generate(inputs, max_new_tokens=3)
        assert model.past_length == 0 and torch.equal(embeds(), before)

        def explode(tensor, hook):
            if model.past_length:
                raise RuntimeError("boom on a decoding step")

        with pytest.raises(RuntimeError, match="boom"):
            model.generate(inputs, max_new_tokens=3, fwd_hooks=[("hook_embed", explode)])
        assert model.past_length == 0 and torch.equal(embeds(), before)
