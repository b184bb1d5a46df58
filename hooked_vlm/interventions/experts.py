"""Mixture-of-experts interventions (Qwen3-MoE language models): drop experts, patch a source
run's routing into a base run, and measure which experts the tokens of a set are routed to.

Everything acts on the routing weights (`blocks.{l}.mlp.hook_router_weights`, dense
`[batch, pos, expert]`, zero for unselected experts) or, for `mode="reroute"`, on the router
logits. The experts that run are those with a nonzero weight, so a weight set to zero removes an
expert's computation, not only its output. Hook builders return `(hook_name, fn)` pairs, as
every builder of `hooked_vlm.interventions`, and work in `generate`.

For the effect of each expert on a metric, see `hooked_vlm.patching.expert_attribution`.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import Hooks, as_index, batch_rows, check_layers
from hooked_vlm.interventions.patch import activation_patch
from hooked_vlm.interventions.tokens import TokenSet

AblationMode = Literal["drop", "renormalise", "reroute"]


def moe_layers(model, layers: Iterable[int] | int | None = None) -> list[int]:
    """The mixture-of-experts layers among `layers` (default: all of them); a dense layer given
    explicitly is an error."""
    if model.cfg.text.num_experts is None:
        raise ValueError("the model has no mixture-of-experts layers (its language model is dense)")
    if layers is None:
        return [l for l in range(model.cfg.n_layers) if model.cfg.is_moe_layer(l)]
    layers = check_layers(model.cfg.n_layers, layers)
    dense = [l for l in layers if not model.cfg.is_moe_layer(l)]
    if dense:
        raise ValueError(f"layers {dense} have a dense MLP, no experts (dense layers: {list(model.cfg.dense_mlp_layers)})")
    return layers


def group_experts(model, experts: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, expert) pairs, checked, grouped by layer."""
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
        raise TypeError(f"(layer, expert) pairs expected, got {experts!r}")
    n_experts = model.cfg.text.num_experts
    by_layer: dict[int, list[int]] = {}
    for pair in experts:
        try:
            layer, expert = pair
        except (TypeError, ValueError):
            expected = "(layer, expert) pairs expected"
            raise TypeError(f"{expected}, got {pair!r} among the experts (one expert is [(layer, expert)])") from None
        (layer,) = moe_layers(model, as_index(layer, "a layer"))
        expert = as_index(expert, "an expert")
        if not 0 <= expert < n_experts:
            raise IndexError(f"expert {expert} out of range: layer {layer} has {n_experts} experts (0..{n_experts - 1})")
        by_layer.setdefault(layer, []).append(expert)
    if not by_layer:
        raise ValueError("no experts given")
    return {layer: sorted(set(es)) for layer, es in sorted(by_layer.items())}


def expert_ablation(
    model, experts: Iterable[tuple[int, int]], *, mode: AblationMode = "drop", positions: TokenSet | None = None
) -> Hooks:
    """Remove each (layer, expert) in `experts` at every position (or at `positions`).

    `mode`:
    - "drop": its routing weight becomes 0; the token's other experts keep their weights (the
      MLP output loses exactly that expert's weighted output).
    - "renormalise": as drop, and the remaining weights are rescaled to the token's total before
      the drop (1 with `norm_topk_prob`), as if the router had renormalised without it.
    - "reroute": its router logit becomes -inf before the top-k, so the token takes its next
      best expert in its place (pruning the expert from the router).
    A token whose every selected expert is dropped gets a zero MLP output ("renormalise" too).
    """
    if mode not in ("drop", "renormalise", "reroute"):
        raise ValueError(f"unknown expert ablation mode {mode!r} (expected 'drop', 'renormalise' or 'reroute')")
    hook = "hook_router_logits" if mode == "reroute" else "hook_router_weights"
    return [
        (f"blocks.{layer}.mlp.{hook}", _ablate(model, layer_experts, mode, positions))
        for layer, layer_experts in group_experts(model, experts).items()
    ]


def _ablate(model, experts: list[int], mode: AblationMode, positions: TokenSet | None):

    def ablate(x: Float[Tensor, "batch pos expert"], hook) -> Tensor:
        edited = x.clone()
        if mode == "reroute":
            edited[..., experts] = torch.finfo(x.dtype).min
        else:
            edited[..., experts] = 0
            if mode == "renormalise":
                before, after = x.float().sum(-1, keepdim=True), edited.float().sum(-1, keepdim=True)
                scale = torch.where(after != 0, before / after.where(after != 0, 1.0), 0.0)
                edited = (edited.float() * scale).to(x.dtype)
        if positions is None:
            return edited
        window = positions.window(model.past_length, x.shape[1], x.device)
        selected = batch_rows(window, x.shape[0], "the position set", hook.name)
        return torch.where(selected[..., None], edited, x)

    return ablate


def router_patch(
    model,
    base: VLMInput,
    source: VLMInput | Mapping[str, Tensor],
    *,
    layers: Iterable[int] | int | None = None,
    positions: TokenSet | None = None,
    source_inputs: VLMInput | None = None,
) -> Hooks:
    """The source run's routing at the MoE `layers` (default: all) and `positions` (default:
    all): each patched token runs the experts the source chose for it, with the source's weights,
    on the base run's hidden state. `source`: a `VLMInput` (run now) or a cache holding the
    layers' `mlp.hook_router_weights`. Source and base must share their token layout."""
    names = [f"blocks.{layer}.mlp.hook_router_weights" for layer in moe_layers(model, layers)]
    return activation_patch(model, base, source, names, positions=positions, source_inputs=source_inputs)


@torch.no_grad()
def expert_usage(
    model,
    inputs: VLMInput,
    positions: TokenSet | None = None,
    *,
    statistic: Literal["selected", "weight"] = "selected",
) -> Float[Tensor, "layer expert"]:
    """How the tokens of `positions` (default: every real token) are routed, per layer and
    expert: the fraction of them that select the expert ("selected") or its mean routing weight
    ("weight"). Rows of dense layers are NaN."""
    if statistic not in ("selected", "weight"):
        raise ValueError(f"unknown statistic {statistic!r} (expected 'selected' or 'weight')")
    layers = moe_layers(model)
    names = [f"blocks.{layer}.mlp.hook_router_weights" for layer in layers]
    _, cache = model.run_with_cache(inputs, names_filter=names, return_cache_object=False)
    tokens = inputs.attention_mask.bool() if positions is None else positions.mask & inputs.attention_mask.bool().cpu()
    if not tokens.any():
        raise ValueError("the position set holds no token")
    out = torch.full((model.cfg.n_layers, model.cfg.text.num_experts), float("nan"), dtype=torch.float64)
    for layer, name in zip(layers, names):
        weights = cache[name][tokens.to(cache[name].device)].double()  # [token, expert]
        out[layer] = ((weights != 0).double() if statistic == "selected" else weights).mean(0).cpu()
    return out
