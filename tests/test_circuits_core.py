"""What circuits need from the core, at no cost to anything else: branch-input hooks
(`hook_attn_in`, `hook_mlp_in`), the per-head input path (`Attention.forward_split`), and
per-query-head keys and values for grouped-query attention (`ungrouped_kv`)."""

from __future__ import annotations

import pytest
import torch
from circuit_pairs import load

from hooked_vlm.circuits import ungrouped_kv

PROMPT = "Where is the cat?"


@pytest.fixture(scope="module", params=["llava_base", "internvl_6b"])
def model_and_inputs(request, tiny_checkpoint, photos):
    model = load(tiny_checkpoint, request.param)
    return model, model.prepare(photos["chelsea"], PROMPT)


def test_branch_input_hooks_edit_the_branch_not_the_residual_stream(model_and_inputs):
    model, inputs = model_and_inputs
    for branch, residual, out in (("hook_attn_in", "hook_resid_pre", "hook_attn_out"), ("hook_mlp_in", "hook_resid_mid", "hook_mlp_out")):
        names = [f"blocks.1.{n}" for n in (residual, out, "hook_resid_mid" if branch == "hook_attn_in" else "hook_resid_post")]
        _, cache = model.run_with_cache(inputs, names_filter=names)
        with model.hooks(fwd_hooks=[(f"blocks.1.{branch}", lambda x, hook: x + 1.0)]):  # RMSNorm ignores a scale
            _, edited = model.run_with_cache(inputs, names_filter=names)
        before, branch_out, after = names
        assert torch.equal(edited[before], cache[before])  # the stream entering the block is untouched
        assert not torch.allclose(edited[branch_out], cache[branch_out])  # the branch read the edit
        torch.testing.assert_close(edited[after], cache[before] + edited[branch_out], rtol=1e-12, atol=1e-12)  # the skip did not


def test_the_per_head_input_path_with_equal_inputs_is_the_plain_forward(model_and_inputs):
    model, inputs = model_and_inputs
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("blocks.0.") and n.endswith(("ln1.hook_normalized", "hook_attn_out")))
    x = cache["blocks.0.ln1.hook_normalized"]
    attn = model.blocks[0].attn
    rotary = model.rotary(inputs.position_ids, x.dtype)
    from hooked_vlm.model import causal_mask

    mask = causal_mask(inputs.attention_mask, x.shape[1], x.dtype)
    per = lambda n: x[:, :, None].expand(-1, -1, n, -1)  # noqa: E731
    h, kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    for n_kv in {kv, h}:  # grouped key/value inputs, and one per query head
        out = attn.forward_split(per(h), per(n_kv), per(n_kv), rotary=rotary, mask=mask)
        torch.testing.assert_close(out, cache["blocks.0.hook_attn_out"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="per-head inputs have 3 heads"):
        attn.forward_split(per(h), per(3), per(3), rotary=rotary, mask=mask)


def test_ungrouped_keys_and_values_change_no_output(tiny_checkpoint, photos):
    model = load(tiny_checkpoint, "internvl_6b", dtype=torch.float32)  # 4 query heads, 2 key/value heads
    inputs = model.prepare(photos["chelsea"], PROMPT)
    logits, cache = model.run_with_cache(inputs, names_filter="blocks.1.attn.hook_k")
    with ungrouped_kv(model):
        ungrouped, ucache = model.run_with_cache(inputs, names_filter="blocks.1.attn.hook_k")
        generated = model.generate(inputs, max_new_tokens=4, return_tokens=True)
    torch.testing.assert_close(ungrouped, logits, rtol=1e-6, atol=1e-6)
    assert cache["blocks.1.attn.hook_k"].shape[2] == 2 and ucache["blocks.1.attn.hook_k"].shape[2] == 4
    torch.testing.assert_close(ucache["blocks.1.attn.hook_k"][:, :, 2], cache["blocks.1.attn.hook_k"][:, :, 1])
    assert torch.equal(generated, model.generate(inputs, max_new_tokens=4, return_tokens=True))  # KV cache per query head too
    assert not any(m.ungroup_kv for m in model.modules() if hasattr(m, "ungroup_kv"))  # restored after the block
