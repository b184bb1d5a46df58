"""Interventions as hook builders: each returns a list of `(hook_name, fn)` pairs.

Use them wherever hooks go, and combine them freely (lists concatenate; hooks on one hook point
run in the order given):

    from hooked_vlm import interventions as iv

    obj = iv.object_tokens(inputs, box, dilation=1)
    ablate = iv.token_ablation(model, obj, mean)                    # mean: iv.load_mean(path, model)
    block = iv.attention_knockout(model, iv.after_image(inputs), obj, layers=range(8, 12))

    logits = model.run_with_hooks(inputs, fwd_hooks=ablate + block)
    texts = model.generate(inputs, max_new_tokens=32, fwd_hooks=block)  # active on every step
    with iv.apply(model, ablate, block):                              # removed on exit, even on error
        logits, cache = model.run_with_cache(inputs)

Mixture-of-experts models add `expert_ablation`, `router_patch` and `expert_usage` (`experts`).

Tokens are addressed through `inputs.layout` (`TokenSet`, `PatchSet`; see `tokens`). Hooks read
`model.past_length` to place a decoding step's `[batch, 1, ...]` activations, so they work
unchanged in a KV-cached `generate`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from hooked_vlm.interventions._common import Hook, Hooks
from hooked_vlm.interventions.ablation import token_ablation
from hooked_vlm.interventions.experts import expert_ablation, expert_usage, router_patch
from hooked_vlm.interventions.heads import head_ablation, mean_head_activations
from hooked_vlm.interventions.knockout import attention_knockout
from hooked_vlm.interventions.means import MeanEmbedding, compute_mean_embedding, load_mean, model_fingerprint, save_mean
from hooked_vlm.interventions.patch import activation_patch, head_patch
from hooked_vlm.interventions.rearrange import copy_tokens, object_extension, token_shuffle
from hooked_vlm.interventions.tokens import (
    PatchSet,
    TokenSet,
    after_image,
    answer_tokens,
    image_tokens,
    object_tokens,
    positions,
    random_tokens,
    view_groups,
    vision_patches,
)


@contextlib.contextmanager
def apply(model, *hooks: Hooks) -> Iterator:
    """Attach every given hook list for the duration of the block (`model.hooks`: names and
    returned shapes are checked; hooks are removed on exit, also when the block raises)."""
    with model.hooks(fwd_hooks=[pair for group in hooks for pair in group]) as hooked:
        yield hooked


__all__ = [
    "Hook",
    "Hooks",
    "apply",
    "TokenSet",
    "PatchSet",
    "image_tokens",
    "object_tokens",
    "after_image",
    "answer_tokens",
    "positions",
    "random_tokens",
    "view_groups",
    "vision_patches",
    "token_ablation",
    "MeanEmbedding",
    "compute_mean_embedding",
    "save_mean",
    "load_mean",
    "model_fingerprint",
    "token_shuffle",
    "copy_tokens",
    "object_extension",
    "attention_knockout",
    "activation_patch",
    "head_patch",
    "head_ablation",
    "mean_head_activations",
    "expert_ablation",
    "router_patch",
    "expert_usage",
]
