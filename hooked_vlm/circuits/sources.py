"""What the edge-masked forward reads from a run (`hooked_vlm.circuits.forward`): every source's
output, and the residual stream every destination reads before its norm.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from hooked_vlm.circuits.structure import Structure
from hooked_vlm.inputs import VLMInput


class Sources(dict):
    """Source group index -> that source's outputs `[rows, pos, n, d_model]` in one run, and in
    `streams` the residual stream each destination group reads in that run, before its norm
    (`(tower, key, layer)` -> `[rows, pos, d_model]`; "q", "k" and "v" of a layer share one)."""

    def __init__(self, outputs: dict[int, Tensor], streams: dict[tuple[str, str, int], Tensor] | None = None):
        super().__init__(outputs)
        self.streams = streams or {}


def source_outputs(model, inputs: VLMInput, structure: Structure, fwd_hooks=(), streams: bool = True) -> tuple[Tensor, Sources]:
    """A plain forward of `inputs` keeping every source's output (`[rows, pos, n, d_model]`;
    vision rows are views): heads from `hook_result` (times InternViT's layer scale), MLPs from
    `hook_mlp_out`, inputs from `hook_inputs_embeds` (the language model; its image positions are
    the projector's output when the vision tower is in the graph) or the tower's first residual;
    and the residual stream every destination reads (`Sources.streams`, which a plain
    `edge_forward` starts from), unless `streams=False` or a hook is passed or attached: a hook
    could edit a stream, which would then not be the input plus every source's output."""
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        kept[hook.name] = x

    streams = _stream_hooks(model, structure) if streams and not fwd_hooks and not has_hooks(model) else {}
    names = [name for name, _ in _source_hooks(model, structure)] + list(streams)
    with model.hooks(fwd_hooks=list(fwd_hooks) + [(name, keep) for name in names]):
        logits = model(inputs)
    outputs = {group: fn(kept, inputs) for group, fn in _source_readers(model, structure).items()}
    return logits, Sources(outputs, {key: kept[name] for name, keys in streams.items() for key in keys})


def has_hooks(model) -> bool:
    """Whether a hook is attached to any hook point of `model` (`model.hooks`, `add_hook`)."""
    return any(hook.fwd_hooks or hook.bwd_hooks for hook in model.hook_dict.values())


def source_space(source) -> str:
    """The residual stream a source writes into (the projector: the language model's)."""
    return "vision" if source.tower == "vision" else "language"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision models (differences and sums of many terms lose digits in bf16),
    the model's own dtype when it is fp32 or fp64."""
    return torch.promote_types(dtype, torch.float32)


def _stream_hooks(model, structure: Structure) -> dict[str, list[tuple[str, str, int]]]:
    """The hook whose value each destination group reads before any patch: a block's attention
    input (its q, k and v), its MLP input, and the last residual stream (the logits; the projector)."""
    names: dict[str, list[tuple[str, str, int]]] = {}
    for tower in structure.towers:
        prefix = "vision." if tower == "vision" else ""
        n_layers = structure.shapes[tower].n_layers
        for layer in range(n_layers):
            names[f"{prefix}blocks.{layer}.hook_attn_in"] = [(tower, key, layer) for key in ("q", "k", "v")]
            names[f"{prefix}blocks.{layer}.hook_mlp_in"] = [(tower, "mlp", layer)]
        sink = ("language", "logits", n_layers) if tower == "language" else ("projector", "projector", n_layers)
        names[f"{prefix}blocks.{n_layers - 1}.hook_resid_post"] = [sink]
    return names


def _source_hooks(model, structure: Structure) -> list[tuple[str, None]]:
    names = []
    for tower in structure.towers:
        prefix = "vision." if tower == "vision" else ""
        for layer in range(structure.shapes[tower].n_layers):
            names += [f"{prefix}blocks.{layer}.attn.hook_result", f"{prefix}blocks.{layer}.hook_mlp_out"]
    if "vision" in structure.towers:
        names.append("vision.blocks.0.hook_resid_pre")
    names.append("hook_inputs_embeds")
    return [(name, None) for name in names]


def _source_readers(model, structure: Structure) -> dict[int, Callable[[dict, VLMInput], Tensor]]:
    readers: dict[int, Callable] = {}
    for i, span in enumerate(structure.sources):
        prefix = "vision." if span.tower == "vision" else ""
        block = None if span.layer < 0 else (model.vision.blocks if span.tower == "vision" else model.blocks)[span.layer]
        if span.key == "heads":
            name = f"{prefix}blocks.{span.layer}.attn.hook_result"
            scale = block.lambda_1 if block.layer_scale else None
            readers[i] = lambda kept, inputs, name=name, scale=scale: kept[name] if scale is None else scale * kept[name]
        elif span.key == "mlp":
            name = f"{prefix}blocks.{span.layer}.hook_mlp_out"
            readers[i] = lambda kept, inputs, name=name: kept[name][:, :, None]
        elif span.tower == "vision":
            readers[i] = lambda kept, inputs: kept["vision.blocks.0.hook_resid_pre"][:, :, None]
        else:
            part = None if "vision" not in structure.towers else span.key  # "input" (text) or "projector" (image)
            readers[i] = lambda kept, inputs, part=part: _embeds_part(kept["hook_inputs_embeds"], inputs, part)
    return readers


def _embeds_part(embeds: Tensor, inputs: VLMInput, part: str | None) -> Tensor:
    if part is None:
        return embeds[:, :, None]
    image = inputs.image_token_mask().to(embeds.device)[..., None]
    return (torch.where(image, embeds, 0.0) if part == "projector" else torch.where(image, 0.0, embeds))[:, :, None]
