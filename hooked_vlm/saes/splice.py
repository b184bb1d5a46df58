"""Splicing SAEs into a model, as SAELens's `HookedSAETransformer` does, for a call or a block.

While an SAE is spliced at hook `H`, the activation at `H` is replaced by the SAE's output, and
the SAE's hook points join the model's under `H`: `H.hook_sae_input`, `H.hook_sae_acts_pre`,
`H.hook_sae_acts_post`, `H.hook_sae_recons`, `H.hook_sae_error`, `H.hook_sae_output` (SAELens's
names). They are in `model.hook_dict`, so `run_with_cache` caches features, and patching or
ablation hooks (`hooked_vlm.interventions`) work on them like on any activation. Hooks on `H`
itself see the SAE's output (what flows on). On leaving the block, even by an exception, the
SAEs and their hook points are gone.

`tokens` restricts where the SAE's output replaces the activation: "image" or "text" (the
language model's image tokens, or every other real token, generated ones included), a
`TokenSet`, or for a vision-tower hook a `PatchSet`. The SAE still encodes every position (the
cached features, and `hook_sae_output`, keep the activation's shape), but elsewhere the model's
own activation flows on, so editing features there changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions._common import axes_of, batch_rows, check_hook_name
from hooked_vlm.interventions.tokens import PatchSet, TokenSet, image_tokens
from hooked_vlm.saes.sae import SAE

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")
Tokens = str | TokenSet | PatchSet | None


@contextlib.contextmanager
def spliced(
    model,
    saes: SAE | Sequence[SAE],
    *,
    use_error_term: bool | None = None,
    tokens: Tokens = None,
    inputs: VLMInput | None = None,
) -> Iterator:
    """Splice `saes` into `model` for the duration of the block (see the module's docstring).
    `use_error_term`, if given, overrides each SAE's own for the block. `inputs` resolves
    `tokens="image"`/`"text"`."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    names = [_checked(model, sae, saes) for sae in saes]
    where = resolve_tokens(tokens, inputs)
    undo: list = []
    try:
        for name, sae in zip(names, saes):
            undo.append(_splice(model, name, sae, use_error_term, where))
        model.setup()
        yield model
    finally:
        for restore in reversed(undo):
            restore()
        model.setup()
        for sae in saes:
            sae.setup()  # its hook points' names are its own again


def resolve_tokens(tokens: Tokens, inputs: VLMInput | None) -> TokenSet | PatchSet | None:
    """None for every position; a TokenSet or PatchSet as given; "image"/"text" from `inputs`."""
    if tokens is None or tokens == "all" or isinstance(tokens, (TokenSet, PatchSet)):
        return None if tokens == "all" else tokens
    if tokens not in ("image", "text"):
        raise ValueError(f"tokens must be 'all', 'image', 'text', a TokenSet or a PatchSet, got {tokens!r}")
    if inputs is None:
        raise ValueError(f"tokens={tokens!r} needs the inputs whose image tokens it means: pass inputs=")
    image = image_tokens(inputs)
    if tokens == "image":
        return image
    return TokenSet(inputs.attention_mask.cpu().bool() & ~image.mask, include_generated=True)


def _checked(model, sae: SAE, saes: list[SAE]) -> str:
    if not isinstance(sae, SAE):
        raise TypeError(f"saes must be SAE objects (hooked_vlm.saes), got {type(sae).__name__}")
    name = sae.cfg.hook_name
    if name is None:
        raise ValueError("this SAE names no hook (cfg.hook_name is None): load it with hook_name=")
    check_hook_name(model, name)
    if sum(other.cfg.hook_name == name for other in saes) > 1:
        raise ValueError(f"two SAEs are to be spliced at {name}")
    if any(f"{name}.{child}" in model.hook_dict for child in SAE_HOOKS):
        raise ValueError(f"an SAE is already spliced at {name}")
    if name.rsplit(".", 1)[-1] in SAE_HOOKS:
        raise ValueError(f"{name} is an SAE's own hook point: splice at the model's hooks")
    return name


def _splice(model, name: str, sae: SAE, use_error_term: bool | None, where) -> Any:
    """Attach one SAE at `name`; return the function that detaches it."""
    _check_positions(name, where)
    point = model.hook_dict[name]
    previous_error_term = sae.use_error_term
    if use_error_term is not None:
        sae.use_error_term = use_error_term

    def replace(activation: Tensor, hook) -> Tensor:
        out = sae(activation)
        if where is None:
            return out
        return torch.where(_mask(model, where, activation, name), out, activation)

    # permanent: model.hooks()/run_with_hooks remove their own hooks on exit, not this one;
    # prepended: hooks the user adds at `name` see the SAE's output, what flows on
    handle = point.add_hook(replace, is_permanent=True, prepend=True)
    for child in SAE_HOOKS:
        point.add_module(child, getattr(sae, child))

    def restore() -> None:
        handle.hook.remove()
        if handle in point.fwd_hooks:
            point.fwd_hooks.remove(handle)
        for child in SAE_HOOKS:
            point._modules.pop(child, None)
        sae.use_error_term = previous_error_term

    return restore


def _check_positions(name: str, where) -> None:
    if where is None:
        return
    axes = axes_of(name)
    if axes.has_key_axis or axes.position != 1 or axes.tower == "projector":
        raise ValueError(f"{name}: a token restriction needs a hook with positions on axis 1 (not scores, patterns or projector hooks)")
    if axes.tower == "language" and not isinstance(where, TokenSet):
        raise TypeError(f"{name} is a language-model hook: restrict it with a TokenSet, 'image' or 'text'")
    if axes.tower == "vision" and not isinstance(where, PatchSet):
        raise TypeError(f"{name} is a vision-tower hook: restrict it with a PatchSet")


def _mask(model, where: TokenSet | PatchSet, activation: Tensor, name: str) -> Tensor:
    """Where the SAE's output is written, broadcastable to `activation` `[batch, pos, ...]`."""
    if isinstance(where, PatchSet):
        mask = where.mask.to(activation.device)
        if mask.shape != activation.shape[:2]:
            raise ValueError(f"the patch set covers {tuple(mask.shape)} (view, position) but {name} is {tuple(activation.shape)}")
    else:  # a decoding step's positions start at model.past_length
        window = where.window(model.past_length, activation.shape[1], activation.device)
        mask = batch_rows(window, activation.shape[0], "the token set", name)
    return mask.view(*mask.shape, *[1] * (activation.dim() - 2))


def run_with_saes(model, *model_args: Any, saes: SAE | Sequence[SAE] = (), use_error_term: bool | None = None, tokens: Tokens = None, **kwargs: Any) -> Tensor:
    """The model's output with `saes` spliced in for this one call."""
    with spliced(model, saes, use_error_term=use_error_term, tokens=tokens, inputs=_inputs(model_args)):
        return model(*model_args, **kwargs)


def run_with_cache_with_saes(
    model, *model_args: Any, saes: SAE | Sequence[SAE] = (), use_error_term: bool | None = None, tokens: Tokens = None, **kwargs: Any
):
    """`model.run_with_cache` with `saes` spliced in: the cache holds their features too
    (`"<hook>.hook_sae_acts_post"`, ...). Keyword arguments go to `run_with_cache`."""
    with spliced(model, saes, use_error_term=use_error_term, tokens=tokens, inputs=_inputs(model_args)):
        return model.run_with_cache(*model_args, **kwargs)


def run_with_hooks_with_saes(
    model, *model_args: Any, saes: SAE | Sequence[SAE] = (), use_error_term: bool | None = None, tokens: Tokens = None, **kwargs: Any
) -> Tensor:
    """`model.run_with_hooks` with `saes` spliced in (the hooks may address their features)."""
    with spliced(model, saes, use_error_term=use_error_term, tokens=tokens, inputs=_inputs(model_args)):
        return model.run_with_hooks(*model_args, **kwargs)


def _inputs(model_args: tuple) -> VLMInput | None:
    return model_args[0] if model_args and isinstance(model_args[0], VLMInput) else None
