"""Token ablation: replace the activations of a token set by a mean vector, zero or seeded noise.

The paper's setting (§1.4) is `hook_inputs_embeds` — the language model's input after the image
features are merged and before any positional term — with one global mean visual embedding
(`compute_mean_embedding`). Any language-model hook with a position axis works the same way.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import Hooks, _indices, axes_of, batch_rows, check_hook_name
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
    seed: int | Sequence[int] = 0,
    inputs: VLMInput | None = None,
) -> Hooks:
    """Replace the activations at `tokens` by `value`:

    - a vector (Tensor or `MeanEmbedding`) of the hook's trailing shape (`[d_model]` for the
      residual stream, `[head, d_head]` for `attn.hook_z`, ...), e.g. the mean visual embedding;
    - "zero";
    - "noise": `noise_std * N(0, 1)`, one draw per token from a generator seeded by the token's
      row seed and its position counted from the row's first real token. `seed`: one int for
      every row (so every row draws the same noise at the same position), or one int per batch
      row to make rows differ: the token experiments pass each sample's own seed, so a sample
      gets the same noise alone or in any batch. `inputs`, the batch the hooks will run on,
      tells where each row's real tokens start under left padding (without it positions count
      from 0, and padding shifts the draws). A token gets the same noise in a KV-cached
      `generate` as in a full forward.

    Active on every call of the hook, decoding steps included (for a TokenSet with
    `include_generated`, generated tokens are ablated as they are fed back in).
    """
    check_position_hook(model, hook)
    row_seeds, row_starts = _noise_origin(tokens, seed, inputs)
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
        seeds = batch_rows(row_seeds, activation.shape[0], "the noise seeds", hook.name)
        starts = batch_rows(row_starts, activation.shape[0], "the noise inputs", hook.name)
        out[selected] = _fill(value, activation, selected, start - starts, noise_std, seeds, hook.name)
        return out

    return [(hook, ablate)]


def _noise_origin(
    tokens: TokenSet, seed: int | Sequence[int], inputs: VLMInput | None
) -> tuple[Int[Tensor, "rows"], Int[Tensor, "rows"]]:
    """Per batch row of `tokens`: the noise seed, and the absolute position of its first real token."""
    n_rows = tokens.mask.shape[0]
    seeds = _indices(seed, "seed")
    if len(seeds) not in (1, n_rows):
        raise ValueError(f"{len(seeds)} noise seeds given for a token set of {n_rows} batch rows")
    if inputs is None:
        starts = torch.zeros(1, dtype=torch.long)
    elif tuple(inputs.attention_mask.shape) != tuple(tokens.mask.shape):
        got, expected = tuple(inputs.attention_mask.shape), tuple(tokens.mask.shape)
        raise ValueError(f"inputs of shape {got} do not match the token set's {expected}: pass the batch it was built from")
    else:
        starts = inputs.attention_mask.cpu().long().argmax(1)  # left padding: the first 1 of each row
    return torch.tensor(seeds, dtype=torch.long), starts


def _fill(
    value: str | Tensor,
    activation: Tensor,
    selected: Bool[Tensor, "batch pos"],
    start: Int[Tensor, "batch"],  # the call's first position, counted from each row's first real token
    noise_std: float,
    seeds: Int[Tensor, "batch"],
    name: str,
) -> Float[Tensor, "k ..."]:
    trailing = activation.shape[2:]
    if isinstance(value, Tensor):
        if value.shape != trailing:
            raise ValueError(f"the ablation vector has shape {tuple(value.shape)} but {name} carries {tuple(trailing)} per token")
        return value.to(activation)
    if value == "zero":
        return torch.zeros((), dtype=activation.dtype, device=activation.device)
    rows, cols = (i.cpu() for i in selected.nonzero(as_tuple=True))
    noise = [_seeded_noise(int(seeds[r]), int(start[r]) + int(c), trailing) for r, c in zip(rows, cols)]
    return (noise_std * torch.stack(noise)).to(activation)


def _seeded_noise(seed: int, position: int, shape: torch.Size) -> Tensor:
    # One generator per token: the draw depends only on (seed, position), not on which other
    # tokens share the call (prefill vs decoding step vs a longer no-cache forward) or the batch.
    mixed = (seed * 1_000_003 + position) % (2**63 - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(mixed))
