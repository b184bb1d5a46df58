"""Moving tokens around: shuffles and copies (the paper's containerization tests, §1.5).

- `token_shuffle`: permute the activations of a token set among its own positions, within each
  view (the whole image: "full shuffle"; an object's tokens: "shuffle inside the mask").
- `copy_tokens`: give each target position the activation of a random source position.
- `object_extension`: fill `rings` token rings around an object with random copies of the
  object's own tokens — the object grows while its inside is scrambled.

Each is a fixed map "position p reads position src[p]", drawn once from `seed` when the hooks are
built, so a forward, a `generate` and a no-cache generation loop all see the same edit. The map
covers prompt positions only; decoding steps pass through.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.inputs import Views, VLMInput
from hooked_vlm.interventions._common import Hooks, batch_rows
from hooked_vlm.interventions.ablation import check_position_hook
from hooked_vlm.interventions.tokens import TokenSet, image_tokens, object_tokens, view_groups


def token_shuffle(
    model,
    inputs: VLMInput,
    tokens: TokenSet | None = None,
    *,
    per_view: bool = True,
    by_sheet: bool = False,
    seed: int = 0,
    hook: str = "hook_inputs_embeds",
) -> Hooks:
    """Permute the activations at `tokens` (default: every image token) among themselves, each
    view separately (`per_view`; text tokens in the set form one group per row), or with
    `by_sheet` each sheet (InternVL's local tiles of an image joined into one group, the
    thumbnail its own, as `copy_tokens` and dilation join them). Positions outside the set are
    untouched. A uniformly random permutation, so a token may stay put."""
    tokens = image_tokens(inputs) if tokens is None else tokens
    _check_prompt_only(tokens, "shuffle")
    groups = _groups(inputs, per_view, by_sheet)
    generator = torch.Generator().manual_seed(seed)
    source = _identity(inputs)
    for row, group in _group_keys(tokens.mask, groups):
        members = (tokens.mask[row] & (groups[row] == group)).nonzero().flatten()
        source[row, members] = members[torch.randperm(len(members), generator=generator)]
    return _read_from(model, source, hook)


def copy_tokens(
    model,
    inputs: VLMInput,
    source: TokenSet,
    target: TokenSet,
    *,
    per_view: bool = True,
    seed: int = 0,
    hook: str = "hook_inputs_embeds",
) -> Hooks:
    """Overwrite each `target` position with the activation of a uniformly drawn `source`
    position of the same row, with replacement; sources are read before any overwrite. With
    `per_view`, of the same view, where InternVL's local tiles of one image count as one view:
    they form one grid of one scale (the sheet dilation grows on, `ImageLayout.sheet_index`), so a
    ring crossing a tile seam is filled from the object's tokens in the next tile. A target group
    with no source to copy from is an error."""
    _check_prompt_only(source, "copy from")
    _check_prompt_only(target, "copy to")
    groups = _groups(inputs, per_view, by_sheet=True)
    generator = torch.Generator().manual_seed(seed)
    read = _identity(inputs)
    for row, group in _group_keys(target.mask, groups):
        in_group = groups[row] == group
        donors = (source.mask[row] & in_group).nonzero().flatten()
        receivers = (target.mask[row] & in_group).nonzero().flatten()
        if len(donors) == 0:
            where = f"the view(s) of sheet {group}" if per_view and group >= 0 else "its tokens"
            raise ValueError(f"row {row}: nothing to copy from in {where} (the source set is empty there)")
        read[row, receivers] = donors[torch.randint(len(donors), (len(receivers),), generator=generator)]
    return _read_from(model, read, hook)


def object_extension(
    model,
    inputs: VLMInput,
    regions,
    rings: int = 1,
    *,
    views: Views = "all",
    seed: int = 0,
    hook: str = "hook_inputs_embeds",
) -> Hooks:
    """Grow each object (one box or mask per image, see `object_tokens`) by `rings` token rings
    filled with random copies of the object's own tokens of the same view (local tiles together,
    see `copy_tokens`) (§1.5, Figure 1)."""
    if not isinstance(rings, int) or rings < 1:
        raise ValueError(f"rings must be a positive int, got {rings!r}")
    inside = object_tokens(inputs, regions, views=views)
    ring = object_tokens(inputs, regions, dilation=rings, views=views) - inside
    return copy_tokens(model, inputs, inside, ring, per_view=True, seed=seed, hook=hook)


# ---------------------------------------------------------------------------------- plumbing
def _check_prompt_only(tokens: TokenSet, what: str) -> None:
    if tokens.include_generated:
        raise ValueError(f"cannot {what} generated tokens: the map covers prompt positions only")


def _groups(inputs: VLMInput, per_view: bool, by_sheet: bool = False) -> Int[Tensor, "batch pos"]:
    """Each position's group: its view (or with `by_sheet`, its sheet), -1 for text; one group
    per row without `per_view`."""
    if not per_view:
        return torch.zeros(inputs.input_ids.shape, dtype=torch.long)
    if not by_sheet:
        return view_groups(inputs)
    groups = torch.full(inputs.input_ids.shape, -1, dtype=torch.long)
    groups[inputs.layout.batch, inputs.layout.position] = inputs.layout.sheet_index()
    return groups


def _group_keys(mask: Tensor, groups: Tensor) -> list[tuple[int, int]]:
    return [(row, group) for row in range(mask.shape[0]) for group in groups[row][mask[row]].unique().tolist()]


def _identity(inputs: VLMInput) -> Int[Tensor, "batch pos"]:
    batch, length = inputs.input_ids.shape
    return torch.arange(length).expand(batch, length).clone()


def _read_from(model, source: Int[Tensor, "batch pos"], hook: str) -> Hooks:
    """Hooks that make position p of row b carry what position `source[b, p]` carried."""
    check_position_hook(model, hook)
    moved = source != torch.arange(source.shape[1])

    def rearrange(activation: Tensor, hook) -> Tensor:
        start, n = model.past_length, activation.shape[1]
        if not moved.any() or start >= source.shape[1]:
            return activation  # a decoding step: only prompt positions are rearranged
        if start != 0 or n < source.shape[1]:
            seen = f"{hook.name} sees positions {start}..{start + n - 1}"
            raise ValueError(f"{seen}; a rearrangement needs the whole prompt at once")
        index = batch_rows(source, activation.shape[0], "the rearrangement", hook.name).to(activation.device)
        if n > index.shape[1]:  # a no-cache forward over prompt + generated tokens
            index = torch.cat([index, torch.arange(index.shape[1], n, device=index.device).expand(index.shape[0], -1)], dim=1)
        index = index.reshape(*index.shape, *([1] * (activation.ndim - 2))).expand_as(activation)
        return activation.gather(1, index)

    return [(hook, rearrange)]
