"""Head ablation (§1.10): silence chosen language-model heads at `attn.hook_z`, so that their
contribution through `o_proj` vanishes (zero) or becomes its average (mean over a reference set)."""

from __future__ import annotations

from typing import Iterable, Literal, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import Hooks, batch_rows, check_layers, group_heads
from hooked_vlm.interventions.tokens import TokenSet


def head_ablation(
    model,
    heads: Iterable[tuple[int, int]],
    value: Literal["zero", "mean"] | Mapping[int, Float[Tensor, "head d_head"]] = "zero",
    *,
    reference: VLMInput | Iterable[VLMInput] | None = None,
    positions: TokenSet | None = None,
) -> Hooks:
    """Ablate each (layer, query head) in `heads` at every position (or at `positions`, e.g.
    with `include_generated`), on every forward and decoding step.

    `value`: "zero"; "mean" (the head's mean `z` over the real tokens of `reference`); or
    precomputed means `{layer: [head, d_head]}` from `mean_head_activations`.
    """
    by_layer = group_heads(model, heads)
    means = None
    if isinstance(value, str):
        if value == "mean":
            if reference is None:
                raise ValueError("mean head ablation needs a reference set: pass reference=inputs")
            means = mean_head_activations(model, reference, layers=list(by_layer))
        elif value != "zero":
            raise ValueError(f"unknown head ablation value {value!r} (expected 'zero', 'mean' or a mapping of means)")
    else:
        means = dict(value)
        text = model.cfg.text
        for layer in by_layer:
            if layer not in means or tuple(means[layer].shape) != (text.n_heads, text.d_head):
                raise ValueError(f"means for layer {layer} must be a [{text.n_heads}, {text.d_head}] tensor")
    return [
        (f"blocks.{layer}.attn.hook_z", _ablate(model, layer_heads, None if means is None else means[layer], positions))
        for layer, layer_heads in by_layer.items()
    ]


def _ablate(model, heads: list[int], mean: Tensor | None, positions: TokenSet | None):

    def ablate(z: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
        out = z.clone()
        fill = torch.zeros((), dtype=z.dtype, device=z.device) if mean is None else mean[heads].to(z)
        if positions is None:
            out[:, :, heads] = fill
            return out
        window = positions.window(model.past_length, z.shape[1], z.device)
        selected = batch_rows(window, z.shape[0], "the position set", hook.name)
        index = torch.tensor(heads, device=z.device)
        rows = out[selected]  # [k, head, d_head]
        rows[:, index] = fill
        out[selected] = rows
        return out

    return ablate


@torch.no_grad()
def mean_head_activations(
    model, reference: VLMInput | Iterable[VLMInput], *, layers: Iterable[int] | None = None
) -> dict[int, Float[Tensor, "head d_head"]]:
    """Each head's `hook_z` averaged over every real (non-padding) token of the reference inputs."""
    layers = check_layers(model.cfg.text.n_layers, layers)
    names = {f"blocks.{layer}.attn.hook_z": layer for layer in layers}
    batches = [reference] if isinstance(reference, VLMInput) else list(reference)
    sums: dict[int, Tensor] = {}
    count = 0
    for inputs in batches:
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names, return_cache_object=False)
        real = inputs.attention_mask.bool().to(model.device)
        for name, layer in names.items():
            total = cache[name][real.to(cache[name].device)].double().sum(0)  # under a device map, the block's device
            sums[layer] = total if layer not in sums else sums[layer] + total
        count += int(real.sum())
    if count == 0:
        raise ValueError("the reference set has no tokens")
    return {layer: (total / count).to(model.dtype) for layer, total in sums.items()}
