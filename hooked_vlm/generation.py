"""Greedy decoding with a KV cache (hooks are attached by the caller, for the whole loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.components import KVCache
from hooked_vlm.inputs import VLMInput

if TYPE_CHECKING:
    from hooked_vlm.model import HookedVLM


def greedy_generate(model: HookedVLM, inputs: VLMInput, max_new_tokens: int) -> Int[Tensor, "batch new_pos"]:
    """Prefill once (vision tower included), then feed one token per step.

    Matches Hugging Face's greedy `generate`: positions continue from each row's last position,
    rows that emitted an end-of-sequence token are padded with `pad_token_id`, and the loop ends
    when every row has finished or `max_new_tokens` tokens were produced.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    try:
        return _greedy_loop(model, inputs, max_new_tokens)
    finally:
        model.past_length = 0  # position-addressed hooks used outside generate must see position 0 again


def _greedy_loop(model: HookedVLM, inputs: VLMInput, max_new_tokens: int) -> Int[Tensor, "batch new_pos"]:
    eos = torch.tensor(model.cfg.eos_token_ids, dtype=torch.long, device=model.device)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = KVCache(model.cfg.text.n_layers)
    logits = model(inputs, kv_cache=cache)
    attention_mask = inputs.attention_mask
    position = inputs.position_ids[:, -1]
    finished = torch.zeros(len(inputs), dtype=torch.bool, device=model.device)
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1).to(model.device)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        new_tokens.append(next_token)
        finished |= torch.isin(next_token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = position + 1
        model.past_length = len(cache)  # before hook_embed fires for this step
        embeds = model.embed_inputs(next_token[:, None], None, None)
        logits = model.run_language_model(embeds, attention_mask, position[:, None], cache)
    return torch.stack(new_tokens, dim=1)
