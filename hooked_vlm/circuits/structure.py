"""The computational graph of a model, as names and index ranges (EAP-IG / MIB conventions).

Sources ("forward" nodes) are what writes into a residual stream: a tower's input, every
attention head (its per-head result, times InternViT's layer scale), every MLP, and — when both
towers are in the graph — the projector, whose output enters the language model at the image
tokens. Destinations ("backward" nodes) are what reads a residual stream, before its norm: each
head's query, key and value input, each MLP's input, the logits (the last residual stream), and
the projector (the vision tower's last residual stream).

For the language model alone the names and the order are EAP-IG's (`hannamw/EAP-IG`,
`graph.py`), so a score matrix is MIB's: sources `input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...`;
destinations `a0.h0<q> .. a0.h{H-1}<q>, a0.h0<k> ..., a0.h0<v> ..., m0, a1.h0<q>, ..., logits`.
Vision-tower nodes carry the prefix `v.` (`v.input`, `v.a3.h1`, `v.m3`, `v.a3.h1<q>`). With
grouped key/value heads (`kv="grouped"`) the key and value destinations are per key/value head:
`a3.kv1<k>` is read by every query head of group 1. Every source of a tower connects to every
destination of a later layer of the same tower, an MLP also to its own layer's heads; the two
towers meet only through the projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

TOWERS = ("vision", "language")
KV = Literal["ungrouped", "grouped"]


@dataclass(frozen=True)
class Span:
    """Consecutive graph indices: one group of sources or of destinations."""

    key: str  # "input", "heads", "mlp", "q", "k", "v", "logits", "projector"
    tower: str  # "vision" or "language"; the projector belongs to neither: "projector"
    layer: int  # -1 for inputs, n_layers for the sink
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TowerShape:
    n_layers: int
    n_heads: int
    n_key_value_heads: int


@dataclass
class Structure:
    """Names, index groups and the real-edge mask of one graph."""

    towers: tuple[str, ...]
    kv: str
    shapes: dict[str, TowerShape]
    src_names: list[str] = field(default_factory=list)
    dst_names: list[str] = field(default_factory=list)
    sources: list[Span] = field(default_factory=list)
    destinations: list[Span] = field(default_factory=list)
    parents: dict[int, list[int]] = field(default_factory=dict)  # destination group -> source groups feeding it
    owners: list[tuple[int, list[int]]] = field(default_factory=list)  # (destination index, its nodes' source indices)

    @property
    def n_src(self) -> int:
        return len(self.src_names)

    @property
    def n_dst(self) -> int:
        return len(self.dst_names)

    def real(self) -> Bool[Tensor, "n_src n_dst"]:
        mask = torch.zeros(self.n_src, self.n_dst, dtype=torch.bool)
        for dst, srcs in self.parents.items():
            for src in srcs:
                mask[self.sources[src].slice, self.destinations[dst].slice] = True
        return mask

    def owner_matrix(self) -> Bool[Tensor, "n_src n_dst"]:
        """owner[u, v]: destination v is an input of node u (EAP-IG's `forward_to_backward`).
        A sink (the logits; the projector when the language model is not in the graph) has none."""
        owner = torch.zeros(self.n_src, self.n_dst, dtype=torch.bool)
        for dst, nodes in self.owners:
            owner[nodes, dst] = True
        return owner

    def sink(self) -> Span:
        return self.destinations[-1]

    def source_group(self, tower: str, key: str, layer: int = -1) -> int | None:
        for i, span in enumerate(self.sources):
            if (span.tower, span.key, span.layer) == (tower, key, layer):
                return i
        return None

    def describe(self) -> dict:
        return {"towers": list(self.towers), "kv": self.kv, "shapes": {t: vars(s) for t, s in self.shapes.items()}}


def build_structure(shapes: dict[str, TowerShape], towers: Sequence[str], kv: KV = "ungrouped") -> Structure:
    """The graph over `towers` ("language", "vision" or both) of towers shaped as `shapes`."""
    if isinstance(towers, str) or not towers or set(towers) - set(TOWERS):
        raise ValueError(f"towers must be a non-empty sequence of {TOWERS}, got {towers!r}")
    towers = tuple(t for t in TOWERS if t in set(towers))
    if kv not in ("ungrouped", "grouped"):
        raise ValueError(f"kv must be 'ungrouped' or 'grouped', got {kv!r}")
    s = Structure(towers=towers, kv=kv, shapes={t: shapes[t] for t in towers})
    if "vision" in towers:
        vision_srcs = _add_tower(s, "vision", shapes["vision"], extra_inputs=[])
        sink = _add_dst(s, "projector", "projector", shapes["vision"].n_layers, ["projector"])
        s.parents[sink] = vision_srcs
        if "language" in towers:
            projector = _add_src(s, "projector", "projector", -1, ["projector"])
            s.owners.append((s.destinations[sink].start, [s.sources[projector].start]))
            lm_srcs = _add_tower(s, "language", shapes["language"], extra_inputs=[projector])
            s.parents[_add_dst(s, "logits", "language", shapes["language"].n_layers, ["logits"])] = lm_srcs
    else:
        lm_srcs = _add_tower(s, "language", shapes["language"], extra_inputs=[])
        s.parents[_add_dst(s, "logits", "language", shapes["language"].n_layers, ["logits"])] = lm_srcs
    return s


def _add_tower(s: Structure, tower: str, shape: TowerShape, extra_inputs: list[int]) -> list[int]:
    """Add one tower's nodes; returns the source groups that reach past its last layer."""
    p = "v." if tower == "vision" else ""
    upstream = list(extra_inputs) + [_add_src(s, "input", tower, -1, [f"{p}input"])]
    n_kv = shape.n_heads if s.kv == "ungrouped" else shape.n_key_value_heads
    for layer in range(shape.n_layers):
        heads = [f"{p}a{layer}.h{h}" for h in range(shape.n_heads)]
        q = _add_dst(s, "q", tower, layer, [f"{name}<q>" for name in heads])
        kv_names = heads if n_kv == shape.n_heads else [f"{p}a{layer}.kv{g}" for g in range(n_kv)]
        k = _add_dst(s, "k", tower, layer, [f"{name}<k>" for name in kv_names])
        v = _add_dst(s, "v", tower, layer, [f"{name}<v>" for name in kv_names])
        for group in (q, k, v):
            s.parents[group] = list(upstream)
        head_group = _add_src(s, "heads", tower, layer, heads)
        mlp_dst = _add_dst(s, "mlp", tower, layer, [f"{p}m{layer}"])
        s.parents[mlp_dst] = upstream + [head_group]
        mlp_group = _add_src(s, "mlp", tower, layer, [f"{p}m{layer}"])
        _own(s, head_group, q, k, v, shape.n_heads // n_kv)
        s.owners.append((s.destinations[mlp_dst].start, [s.sources[mlp_group].start]))
        upstream += [head_group, mlp_group]
    return upstream


def _own(s: Structure, head_group: int, q: int, k: int, v: int, group_size: int) -> None:
    first = s.sources[head_group].start
    n_heads = len(s.sources[head_group])
    for h in range(n_heads):
        s.owners.append((s.destinations[q].start + h, [first + h]))
    for dst in (k, v):
        for g in range(len(s.destinations[dst])):
            s.owners.append((s.destinations[dst].start + g, [first + g * group_size + i for i in range(group_size)]))


def _add_src(s: Structure, key: str, tower: str, layer: int, names: list[str]) -> int:
    s.sources.append(Span(key, tower, layer, len(s.src_names), len(s.src_names) + len(names)))
    s.src_names.extend(names)
    return len(s.sources) - 1


def _add_dst(s: Structure, key: str, tower: str, layer: int, names: list[str]) -> int:
    s.destinations.append(Span(key, tower, layer, len(s.dst_names), len(s.dst_names) + len(names)))
    s.dst_names.extend(names)
    return len(s.destinations) - 1


def model_shapes(model) -> dict[str, TowerShape]:
    """Both towers' shapes; the vision tower as it runs (only the blocks up to the feature layer)."""
    vision, text = model.cfg.vision, model.cfg.text
    return {
        "vision": TowerShape(len(model.vision.blocks), vision.n_heads, vision.n_key_value_heads),
        "language": TowerShape(text.n_layers, text.n_heads, text.n_key_value_heads),
    }
