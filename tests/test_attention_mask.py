"""The language model's attention mask as SDPA sees it: transformers' rule
(`masking_utils._ignore_causal_mask_sdpa`). Nothing padded and as many queries as keys -> no mask
and SDPA's `is_causal` (its fast kernel); one query (a decoding step) -> no mask; otherwise (a
padded batch, a suffix after a cached prefix) the explicit additive mask. The eager path (patterns
hooked) sees the same mask either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooked_vlm import HookedVLM
from hooked_vlm.components.attention import Attention, KVCache
from hooked_vlm.config import TransformerConfig


@pytest.fixture(scope="module", params=["internvl_moe", "llava_base"])
def model(request, tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint(request.param))


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """Every SDPA call of the language model (queries of width d_head) as {mask, is_causal, queries, keys}."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append(dict(mask=attn_mask, is_causal=is_causal, queries=q.shape[2], keys=k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def _lm_calls(model, calls: list[dict]) -> list[dict]:
    return calls[-model.cfg.n_layers :]  # the language model runs after the vision tower


@torch.no_grad()
def test_an_unpadded_forward_uses_sdpas_causal_kernel_and_equals_eager(model, photos, sdpa_calls):
    inputs = model.prepare(photos["rocket"], "Where is the rocket?")
    logits = model(inputs)
    lm = _lm_calls(model, sdpa_calls)
    assert all(call["mask"] is None and call["is_causal"] for call in lm), lm
    model.set_attention_implementation("eager")
    try:
        eager = model(inputs)
    finally:
        model.set_attention_implementation("auto")
    assert (logits - eager).abs().max() <= 1e-5 * eager.abs().max()


@torch.no_grad()
def test_a_padded_batch_keeps_the_explicit_mask(model, photos, sdpa_calls):
    inputs = model.prepare([photos["rocket"], photos["astronaut"]], ["Where is the rocket?", "Describe this photo in detail please."])
    assert not inputs.attention_mask.all()
    model(inputs)
    lm = _lm_calls(model, sdpa_calls)
    assert all(call["mask"] is not None and not call["is_causal"] for call in lm), lm


@torch.no_grad()
def test_a_decoding_step_attends_to_every_key_without_a_mask(model, photos, sdpa_calls):
    inputs = model.prepare(photos["rocket"], "Where is the rocket?")
    model.generate(inputs, max_new_tokens=2)
    step = _lm_calls(model, sdpa_calls)
    assert all(call["queries"] == 1 and call["mask"] is None and not call["is_causal"] for call in step), step


@torch.no_grad()
def test_a_suffix_after_a_cached_prefix_keeps_the_explicit_mask(model, photos, sdpa_calls):
    inputs = model.prepare(photos["rocket"], "Where is the rocket?")
    embeds = model.embed_inputs(inputs.input_ids, model.encode_images(inputs.pixel_values), inputs.image_token_mask())
    whole = model.run_language_model(embeds, inputs.attention_mask, inputs.position_ids)
    cache, split = KVCache(model.cfg.n_layers), embeds.shape[1] - 3
    model.run_language_model(embeds[:, :split], inputs.attention_mask[:, :split], inputs.position_ids[:, :split], cache)
    suffix = model.run_language_model(embeds[:, split:], inputs.attention_mask, inputs.position_ids[:, split:], cache)
    lm = _lm_calls(model, sdpa_calls)
    assert all(call["queries"] == 3 and call["mask"] is not None and not call["is_causal"] for call in lm), lm
    assert (suffix - whole[:, split:]).abs().max() <= 1e-5 * whole.abs().max()


@torch.no_grad()
def test_a_hooked_pattern_of_an_unpadded_input_is_causal(model, photos):
    inputs = model.prepare(photos["rocket"], "Where is the rocket?")
    logits, cache = model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_attn_scores")
    scores = cache["blocks.0.attn.hook_attn_scores"][0, 0]
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert (scores[future] == torch.finfo(scores.dtype).min).all() and (scores[~future] > -1e4).all()
    assert (logits - model(inputs)).abs().max() <= 1e-5 * logits.abs().max()


def test_causal_attention_refuses_fewer_queries_than_keys():
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=10)
    attention, cache = Attention(cfg), KVCache(1)
    attention(torch.randn(1, 4, 16), causal=True, kv_cache=cache)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(torch.randn(1, 2, 16), causal=True, kv_cache=cache)
