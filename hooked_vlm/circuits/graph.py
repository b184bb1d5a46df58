"""`Graph`: the score matrix of every edge of a model, and which edges a circuit keeps.

A graph is dense, as EAP-IG's: `scores[src, dst]` (or `[src, dst, span]` with position spans),
`real[src, dst]` marks the pairs that are edges, `in_circuit` the edges a circuit keeps and
`node_in_circuit` its source nodes. Names and order are EAP-IG's (`hooked_vlm.circuits.structure`),
so a language-model graph reads and writes the JSON and .pt files of EAP-IG and MIB
(`hooked_vlm.circuits.io`). Selecting a circuit (top-n, greedy, threshold, pruning) is
`hooked_vlm.circuits.find_circuit`.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vlm.circuits.structure import KV, Structure, TowerShape, build_structure, model_shapes


class Graph:
    """Every edge of a model's graph over `towers`, with scores and circuit membership.

    Build one with `Graph.from_model(model, towers=("language",), kv="ungrouped", spans=None)`;
    `edge_attribution` returns one with its scores filled. `spans` names position spans
    (`hooked_vlm.circuits.spans`): each edge then has one score per span.
    """

    def __init__(self, structure: Structure, spans: Sequence[str] | None = None):
        self.structure = structure
        self.spans = None if spans is None else tuple(spans)
        shape = (structure.n_src, structure.n_dst) + (() if spans is None else (len(self.spans),))
        self.real: Bool[Tensor, "n_src n_dst"] = structure.real()
        self.owner: Bool[Tensor, "n_src n_dst"] = structure.owner_matrix()
        self.scores: Float[Tensor, "n_src n_dst *span"] = torch.zeros(shape, dtype=torch.float32)
        self.in_circuit: Bool[Tensor, "n_src n_dst *span"] = self.real_mask().clone()
        self.node_in_circuit: Bool[Tensor, "n_src"] = torch.ones(structure.n_src, dtype=torch.bool)
        self.meta: dict = {}
        # the language model's width: EAP-IG's `Graph.from_json` needs it in the file's cfg
        self.d_model: int | None = None
        self._src_index = {name: i for i, name in enumerate(structure.src_names)}
        self._dst_index = {name: i for i, name in enumerate(structure.dst_names)}

    @classmethod
    def from_model(cls, model, *, towers: Sequence[str] = ("language",), kv: KV = "ungrouped",
                   spans: Sequence[str] | None = None) -> Graph:  # fmt: skip
        graph = cls(build_structure(model_shapes(model), towers, kv), spans)
        graph.d_model = model.cfg.text.d_model
        return graph

    @classmethod
    def from_shapes(cls, n_layers: int, n_heads: int, n_key_value_heads: int | None = None, *,
                    kv: KV = "ungrouped", spans: Sequence[str] | None = None, d_model: int | None = None) -> Graph:  # fmt: skip
        """A language-model graph without a model (e.g. to read MIB files)."""
        shape = TowerShape(n_layers, n_heads, n_key_value_heads or n_heads)
        graph = cls(build_structure({"language": shape}, ("language",), kv), spans)
        graph.d_model = d_model
        return graph

    # ------------------------------------------------------------------------------ names
    @property
    def src_names(self) -> list[str]:
        return self.structure.src_names

    @property
    def dst_names(self) -> list[str]:
        return self.structure.dst_names

    @property
    def n_src(self) -> int:
        return self.structure.n_src

    @property
    def n_dst(self) -> int:
        return self.structure.n_dst

    @property
    def n_edges(self) -> int:
        """Real edges (times spans, when positions are split into spans)."""
        return int(self.real.sum()) * (1 if self.spans is None else len(self.spans))

    @property
    def n_edges_in_circuit(self) -> int:
        return int((self.in_circuit & self.real_mask()).sum())

    def real_mask(self) -> Bool[Tensor, "n_src n_dst *span"]:
        """`real`, broadcast over spans."""
        return self.real if self.spans is None else self.real[..., None].expand(-1, -1, len(self.spans))

    def src_index(self, name: str) -> int:
        if name not in self._src_index:
            raise KeyError(_unknown("source node", name, self._src_index))
        return self._src_index[name]

    def dst_index(self, name: str) -> int:
        if name not in self._dst_index:
            raise KeyError(_unknown("destination", name, self._dst_index))
        return self._dst_index[name]

    def edge_index(self, name: str) -> tuple[int, ...]:
        """(src, dst[, span]) of an edge named as EAP-IG does, 'a0.h1->a2.h3<q>', with an
        optional span, 'a0.h1->m2@object'."""
        edge, _, span = name.partition("@")
        parent, arrow, child = edge.partition("->")
        if not arrow:
            raise KeyError(f"edge name {name!r} is not 'parent->child'")
        index = (self.src_index(parent), self.dst_index(child))
        if not self.real[index]:
            raise KeyError(f"{edge!r} is not an edge of this graph: {parent} does not write into {child}'s input")
        if self.spans is None:
            if span:
                raise KeyError(f"edge {name!r} names a span but the graph has none")
            return index
        if span not in self.spans:
            raise KeyError(f"edge {name!r}: unknown span {span!r} (spans: {list(self.spans)})")
        return index + (self.spans.index(span),)

    # ------------------------------------------------------------------------------ reading
    def edges(self, top: int | None = None, *, by: str = "abs", in_circuit: bool | None = None) -> pd.DataFrame:
        """One row per real edge: `edge` (EAP-IG's name, '@span' appended with spans), `parent`,
        `child`, `qkv`, `span`, `score`, `in_circuit`; ranked by |score| (`by="abs"`) or signed
        score (`by="signed"`), the first `top` rows. `in_circuit` keeps only edges in (True) or
        out of (False) the circuit."""
        if by not in ("abs", "signed"):
            raise ValueError(f"by must be 'abs' or 'signed', got {by!r}")
        mask = self.real_mask() if in_circuit is None else self.real_mask() & (self.in_circuit == in_circuit)
        index = mask.nonzero()
        scores = self.scores[mask]
        key = scores.abs() if by == "abs" else scores
        order = torch.argsort(key.nan_to_num(float("-inf")), descending=True, stable=True)[:top]
        index, scores = index[order].numpy(), scores[order].double().numpy()
        dst = np.array(self.dst_names, dtype=object)[index[:, 1]]
        table = pd.DataFrame({
            "parent": np.array(self.src_names, dtype=object)[index[:, 0]],
            "child": [name.split("<")[0] for name in dst],
            "qkv": [name[-2] if name.endswith(">") else None for name in dst],
            "span": None if self.spans is None else np.array(self.spans, dtype=object)[index[:, 2]],
            "score": scores,
            "in_circuit": self.in_circuit[tuple(torch.as_tensor(index).T)].numpy(),
        })  # fmt: skip
        edge = table["parent"] + "->" + pd.Series(dst, dtype=object)
        table.insert(0, "edge", edge if self.spans is None else edge + "@" + table["span"])
        return table

    def node_scores(self) -> pd.Series:
        """Σ_v s(u→v) over a source's real edges (and spans): for a head, first order, the effect
        of corrupting the head's output everywhere (`patching.head_attribution` with node="z")."""
        total = torch.where(self.real_mask(), self.scores, 0.0)
        total = total.sum(dim=tuple(range(1, total.dim())))
        return pd.Series(total.double().numpy(), index=self.src_names, name="score")

    def head_scores(self, tower: str = "language") -> Float[Tensor, "layer head"]:
        """Node scores of a tower's heads as a `[n_layers, n_heads]` map."""
        shape = self.structure.shapes.get(tower)
        if shape is None:
            raise ValueError(f"the graph has no {tower} tower (towers: {list(self.structure.towers)})")
        scores = self.node_scores()
        prefix = "v." if tower == "vision" else ""
        values = [[scores[f"{prefix}a{l}.h{h}"] for h in range(shape.n_heads)] for l in range(shape.n_layers)]
        return torch.tensor(values, dtype=torch.float64)

    def copy(self) -> Graph:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        spans = "" if self.spans is None else f", spans={list(self.spans)}"
        return (f"Graph(towers={list(self.structure.towers)}, kv={self.structure.kv!r}, {self.n_src} sources, "
                f"{self.n_dst} destinations, {self.n_edges} edges, {self.n_edges_in_circuit} in the circuit{spans})")  # fmt: skip

    def check_model(self, model) -> None:
        """A clear error if this graph was not built for `model`'s shape."""
        shapes = model_shapes(model)
        for tower, shape in self.structure.shapes.items():
            if shapes[tower] != shape:
                raise ValueError(f"the graph's {tower} tower is {vars(shape)} but the model's is {vars(shapes[tower])}")


def _unknown(what: str, name: str, known: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    return f"unknown {what} {name!r}" + (f"; did you mean {close}?" if close else "")
