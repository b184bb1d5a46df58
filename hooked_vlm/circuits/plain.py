"""The edge-masked forward of a plain evaluation: only what the weights change.

A plain evaluation (no copies, spans or gradients: `evaluate_circuit`, `faithfulness_curve`)
computes only what the weights change. Summed over every parent, the differences give the
corrupted run's own stream, x + Σ_u (ã_u − a_u) = x̃ (`Sources.streams`), so a destination
whose edges are mostly patched reads x̃ − Σ_u (1 − w[u, v]) · (ã_u − a_u) instead: a small
circuit evaluated by noising adds the differences of its few kept edges to the corrupted
streams. Destinations without a patch share one norm and projection, as in the plain forward,
and the differences (and per-head results) no destination needs are never computed. A hook
could edit a stream: with one passed or attached, in this run or when the other run was
recorded (`source_outputs` then keeps no streams), every destination starts from this run's.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.circuits.sources import Sources, accumulation_dtype, source_space
from hooked_vlm.circuits.structure import Structure


@dataclass
class _Inputs:
    """The inputs of one destination group's `n` columns: `unpatched` lists (stream, columns)
    of the columns reading a stream as it is; `patched` columns read `patch_inputs[:, :, i]`."""

    n: int
    unpatched: list[tuple[Tensor, list[int]]]
    patched: list[int]
    patch_inputs: Tensor | None


@dataclass
class _Plan:
    """How one destination group's columns are patched: each column reads this run's stream
    (base 0) or the other run's (base 1, when most of its edges are patched: x + Σ_u Δ_u over
    every parent is that run's stream), plus `coef`-weighted differences of the sources `rows`."""

    unpatched: dict[int, list[int]]  # base -> columns read as they are
    patched: list[int]
    bases: list[int]  # per patched column
    rows: Tensor  # source indices the patches need
    coef: Tensor  # [len(rows), len(patched)]


class PlainPatcher:
    """The patcher of a plain evaluation (no copies, spans or gradients). It plans each
    destination group once from the weights: a column whose edges are all kept reads this run's
    stream, one whose edges are all patched reads the other run's stream (`Sources.streams`),
    and the rest add the differences of only the sources with a nonzero coefficient, relative to
    whichever stream needs fewer. A small circuit evaluated by noising patches most edges: its
    destinations read the corrupted streams plus the few kept edges' differences. The
    differences of the sources that no patch needs are never computed (nor their heads' results)."""

    copies = 0

    def __init__(self, structure: Structure, weights: Tensor, other: Sources, use_streams: bool):
        self.structure, self.other = structure, other
        self.groups = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.sources)}
        self.dests = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.destinations)}
        w = weights.detach().to("cpu", accumulation_dtype(weights.dtype))
        self.plans = {dst: self._plan(w, dst, use_streams) for dst in range(len(structure.destinations))}
        needed = torch.zeros(structure.n_src, dtype=torch.bool)
        for plan in self.plans.values():
            needed[plan.rows] = True
        self.needed = needed
        # the differences of the needed sources of each residual stream, a row each
        space = torch.tensor([source_space(s) == "vision" for s in structure.sources for _ in range(len(s))])
        self.row_of = torch.zeros(structure.n_src, dtype=torch.long)
        for in_space in (space, ~space):
            self.row_of[needed & in_space] = torch.arange(int((needed & in_space).sum()))
        self.deltas: dict[str, Tensor] = {}

    def _plan(self, w: Tensor, dst: int, use_streams: bool) -> _Plan:
        parents = [self.structure.sources[group] for group in self.structure.parents[dst]]
        start, stop = min(s.start for s in parents), max(s.stop for s in parents)
        if sum(len(s) for s in parents) != stop - start:
            raise RuntimeError(f"the parents of destination group {dst} are not consecutive sources")
        block = w[start:stop, self.structure.destinations[dst].slice]
        # terms relative to this run's stream, and to the other run's; every column at once (a
        # loop over columns cost 0.1-0.8 s a forward on 7B-38B graphs, a GPU forward's time)
        n_patched, n_other = block.ne(0).sum(0), block.ne(1).sum(0)
        from_other = (n_other < n_patched) & use_streams
        as_is = torch.where(from_other, n_other, n_patched) == 0
        unpatched = {base: columns for base, mask in ((0, as_is & ~from_other), (1, as_is & from_other))
                     if (columns := mask.nonzero()[:, 0].tolist())}  # fmt: skip
        patched = (~as_is).nonzero()[:, 0]
        bases = from_other[patched]
        coef = block[:, patched] - bases.to(block.dtype)
        rows = coef.ne(0).any(1).nonzero()[:, 0]
        patched, bases = patched.tolist(), bases.long().tolist()
        return _Plan(unpatched, patched, bases, rows + start, coef[rows])

    def needs(self, tower: str, key: str, layer: int) -> bool:
        span = self.structure.sources[self.groups[tower, key, layer]]
        return bool(self.needed[span.slice].any())

    def add(self, tower: str, key: str, layer: int, output: Tensor) -> None:
        group = self.groups[tower, key, layer]
        span = self.structure.sources[group]
        needed = self.needed[span.slice].nonzero()[:, 0].tolist()
        if not needed:
            return
        dtype = accumulation_dtype(output.dtype)
        other = self.other[group]
        if len(needed) < len(span):
            other, output = other[:, :, needed], output[:, :, needed]
        delta = other.to(output.device, dtype) - output.to(dtype)
        space = source_space(span)
        if space not in self.deltas:
            spans = [s for s in self.structure.sources if source_space(s) == space]
            n_rows = sum(int(self.needed[s.slice].sum()) for s in spans)
            self.deltas[space] = delta.new_empty(n_rows, delta[..., 0, :].numel())
        # one matrix per space, on the device of its first source: a later block's differences
        # may come from another GPU (index_put_ takes no index or value from another device)
        matrix = self.deltas[space]
        rows = self.row_of[span.start + torch.tensor(needed)]
        matrix[rows.to(matrix.device)] = einops.rearrange(delta, "r p u d -> u (r p d)").to(matrix.device)

    def attention(self, block, x: Float[Tensor, "rows pos d_model"], tower: str, layer: int, **attn_kwargs) -> Tensor:
        """The block's attention output from its destinations' inputs."""
        q, k, v = (_projected(block, self.inputs(x, tower, key, layer), key) for key in ("q", "k", "v"))
        return block.attn.attend(q, k, v, layer=layer, **attn_kwargs)

    def inputs(self, x: Float[Tensor, "rows pos d_model"], tower: str, key: str, layer: int) -> _Inputs:
        plan = self.plans[self.dests[tower, key, layer]]
        n = len(self.structure.destinations[self.dests[tower, key, layer]])
        streams = {0: x, 1: None}
        if 1 in plan.unpatched or 1 in plan.bases:
            streams[1] = self.other.streams[tower, key, layer].to(x.device, x.dtype)
        unpatched = [(streams[base], columns) for base, columns in sorted(plan.unpatched.items())]
        if not plan.patched:
            return _Inputs(n, unpatched, [], None)
        deltas = self.deltas[source_space(self.structure.sources[self.structure.parents[self.dests[tower, key, layer]][0]])]
        rows, coef = self.row_of[plan.rows], plan.coef
        low, high = int(rows[0]), int(rows[-1]) + 1
        if high - low <= 3 * len(rows):  # a view of the rows between (zero for the others) costs less than a copy
            coef = coef.new_zeros(high - low, coef.shape[1]).index_copy_(0, rows - low, coef)
            needed = deltas[low:high]
        else:
            needed = deltas[rows.to(deltas.device)]
        patch = coef.to(deltas.device, deltas.dtype).T @ needed
        patch = einops.rearrange(patch, "v (r p d) -> r p v d", r=x.shape[0], p=x.shape[1]).to(x.device)
        base = torch.stack([streams[b] for b in plan.bases], dim=2).to(patch.dtype)
        return _Inputs(n, unpatched, plan.patched, (base + patch).to(x.dtype))

    def patched(self, x: Tensor, tower: str, key: str, layer: int) -> Tensor:
        """`[rows, pos, n_dst, d_model]`: the destinations' inputs."""
        inputs = self.inputs(x, tower, key, layer)
        if not inputs.patched and len(inputs.unpatched) == 1:
            return inputs.unpatched[0][0][:, :, None].expand(-1, -1, inputs.n, -1)
        out = x.new_empty(*x.shape[:2], inputs.n, x.shape[-1])
        for stream, columns in inputs.unpatched:
            out[:, :, columns] = stream[:, :, None]
        if inputs.patched:
            out[:, :, inputs.patched] = inputs.patch_inputs
        return out


def _projected(block, inputs: _Inputs, key: str) -> Float[Tensor, "rows pos n d_head"]:
    """A layer's queries, keys or values from its destinations' inputs: the columns reading an
    unpatched stream share one norm and one projection (of the heads they need), each patched
    column is normalised and projected on its own (`Attention.forward_split`'s per-head path)."""
    attn = block.attn
    proj = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}[key]
    n_proj = proj.weight.shape[0] // attn.cfg.d_head
    rep = inputs.n // n_proj  # > 1: per-query-head keys and values of grouped-query attention (ungrouped)
    parts: list[tuple[list[int], Tensor]] = []
    for stream, columns in inputs.unpatched:
        heads = sorted({c // rep for c in columns})
        normed = block.ln1(stream)
        if len(heads) == n_proj:
            y = proj(normed)
        else:
            rows = torch.tensor([h * attn.cfg.d_head + i for h in heads for i in range(attn.cfg.d_head)], device=normed.device)
            y = F.linear(normed, proj.weight[rows], None if proj.bias is None else proj.bias[rows])
        y = y.view(*y.shape[:2], len(heads), attn.cfg.d_head)
        index = [heads.index(c // rep) for c in columns]
        parts.append((columns, y if index == list(range(len(heads))) else y[:, :, index]))
    if inputs.patched:
        weight = attn.input_weight(proj, inputs.n)[inputs.patched]
        y = einops.einsum(block.ln1(inputs.patch_inputs), weight, "r p h m, h m d -> r p h d")
        if proj.bias is not None:
            y = y + proj.bias.view(n_proj, -1).repeat_interleave(rep, dim=0)[inputs.patched]
        parts.append((inputs.patched, y))
    if len(parts) == 1 and parts[0][0] == list(range(inputs.n)):
        return parts[0][1]
    first = parts[0][1]
    out = first.new_empty(*first.shape[:2], inputs.n, first.shape[-1])
    for columns, y in parts:
        out[:, :, columns] = y
    return out
