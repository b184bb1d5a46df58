"""Token ablation: replace the activations of a token set by a mean vector, zero or seeded noise.

The paper's setting (§1.4) is `hook_inputs_embeds` — the language model's input after the image
features are merged and before any positional term — with one global mean visual embedding
(`compute_mean_embedding`). Any language-model hook with a position axis works the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vlm.interventions._common import Hooks, axes_of, batch_rows, check_hook_name
from hooked_vlm.interventions.means import MeanEmbedding, check_mean_fits
from hooked_vlm.interventions.tokens import TokenSet

AblationValue = Literal["zero", "noise"] | Tensor | MeanEmbedding


def check_position_hook(model, hook: str) -> None:
    """Token interventions address language-model positions on axis 1."""
    check_hook_name(model, hook)
    axes = axes_of(hook)
    if axes.tower != "language" or axes.position != 1:
        raise ValueError(
            f"{hook} has no language-model position axis on dim 1 (vision/projector hooks are indexed by view; "
            "attention scores/patterns by query and key: use attention_knockout)"
        )


def token_ablation(
    model,
    tokens: TokenSet,
    value: AblationValue = "zero",
    *,
    hook: str = "hook_inputs_embeds",
    noise_std: float = 1.0,
    seed: int = 0,
) -> Hooks:
    """Replace the activations at `tokens` by `value`:

    - a vector (Tensor or `MeanEmbedding`) of the hook's trailing shape (`[d_model]` for the
      residual stream, `[head, d_head]` for `attn.hook_z`, ...), e.g. the mean visual embedding;
    - "zero";
    - "noise": `noise_std * N(0, 1)`, drawn per (batch row, absolute position) from `seed`, so a
      token gets the same noise in a KV-cached `generate` and in a full forward.

    Active on every call of the hook, decoding steps included (for a TokenSet with
    `include_generated`, generated tokens are ablated as they are fed back in).
    """
    check_position_hook(model, hook)
    if isinstance(value, MeanEmbedding):
        check_mean_fits(value, model, hook)
        value = value.vector
    if isinstance(value, str) and value not in ("zero", "noise"):
        raise ValueError(f"unknown ablation value {value!r} (expected 'zero', 'noise', a vector or a MeanEmbedding)")

    def ablate(activation: Tensor, hook) -> Tensor:
        start = model.past_length
        window = tokens.window(start, activation.shape[1], activation.device)
        selected = batch_rows(window, activation.shape[0], "the token set", hook.name)
        if not selected.any():
            return activation
        out = activation.clone()
        out[selected] = _fill(value, activation, selected, start, noise_std, seed, hook.name)
        return out

    return [(hook, ablate)]


def _fill(
    value: str | Tensor,
    activation: Tensor,
    selected: Bool[Tensor, "batch pos"],
    start: int,
    noise_std: float,
    seed: int,
    name: str,
) -> Float[Tensor, "k ..."]:
    trailing = activation.shape[2:]
    if isinstance(value, Tensor):
        if value.shape != trailing:
            raise ValueError(f"the ablation vector has shape {tuple(value.shape)} but {name} carries {tuple(trailing)} per token")
        return value.to(activation)
    if value == "zero":
        return torch.zeros((), dtype=activation.dtype, device=activation.device)
    rows, cols = selected.nonzero(as_tuple=True)
    noise = [_seeded_noise(seed, int(r), start + int(c), trailing) for r, c in zip(rows, cols)]
    return (noise_std * torch.stack(noise)).to(activation)


def _seeded_noise(seed: int, row: int, position: int, shape: torch.Size) -> Tensor:
    # One generator per token: the draw depends only on (seed, row, position), not on which
    # other tokens share the call (prefill vs decoding step vs a longer no-cache forward).
    mixed = ((seed * 1_000_003 + row) * 1_000_003 + position) % (2**63 - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(mixed))
