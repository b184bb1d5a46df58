"""The edge-masked forward: every destination reads its own input, with chosen edges corrupted.

For a destination v (a head's query, key or value input, an MLP's input, the logits, the
projector) the input is

    x_v = x + Σ_u w[u, v] · (ã_u − a_u)

where x is the residual stream of this run, a_u the output of source u in this run and ã_u its
output in the corrupted run. w = 0 everywhere is the plain model; w = 1 on an edge replaces that
edge's contribution with the corrupted one (EAP-IG's `evaluate_graph`, intervention "patching").
Each head then normalises its own input (`ln1` per destination, as TransformerLens's split q/k/v
inputs) and projects it (`Attention.forward_split`); every hook of the blocks still fires.
Weights may be fractional or require gradients: ∂M/∂w at w = 0 is EAP's score of every edge.

`weights` is `[n_src, n_dst]`, or `[copies, n_src, n_dst]` to run `copies` differently patched
copies of a batch-1 input side by side, with a trailing span axis when positions are split into
spans (`hooked_vlm.circuits.spans`).

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
from typing import Callable

import einops
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.circuits.structure import Structure
from hooked_vlm.inputs import VLMInput
from hooked_vlm.components.attention import causal_mask, is_plain_causal


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

    streams = _stream_hooks(model, structure) if streams and not fwd_hooks and not _has_hooks(model) else {}
    names = [name for name, _ in _source_hooks(model, structure)] + list(streams)
    with model.hooks(fwd_hooks=list(fwd_hooks) + [(name, keep) for name in names]):
        logits = model(inputs)
    outputs = {group: fn(kept, inputs) for group, fn in _source_readers(model, structure).items()}
    return logits, Sources(outputs, {key: kept[name] for name, keys in streams.items() for key in keys})


def edge_forward(
    model,
    inputs: VLMInput,
    structure: Structure,
    weights: Tensor,
    corrupted: Sources,
    span_index: dict[str, Tensor] | None = None,
    fwd_hooks=(),
    resume: tuple[int, Tensor, Sources] | None = None,
    embeds: Tensor | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of `inputs` with each destination's input patched as the module docstring says.
    `corrupted` holds `source_outputs` of the corrupted input (batch 1 when `weights` has copies);
    `span_index[tower]` gives each position's span (`[rows or 1, positions]`, vision positions
    flattened over views), needed when `weights` has a span axis. `resume=(layer, resid_pre,
    clean_sources)` (language-model graphs whose weights patch nothing before `layer`) starts
    at that block from the clean run's residual stream and source outputs, which the blocks
    before it would reproduce. `embeds`: the plain run's `hook_inputs_embeds` of `inputs`
    (language-model graphs, no copies), so that the vision tower does not run again."""
    patcher = _Patcher(structure, weights, corrupted, span_index)
    if patcher.plain:
        # the other run's streams stand for "x + every difference" only if no hook edits them
        use_streams = (
            bool(corrupted.streams if isinstance(corrupted, Sources) else False) and not fwd_hooks and not _has_hooks(model)
        )
        patcher = _PlainPatcher(structure, weights, corrupted, use_streams)
    if embeds is not None and ("vision" in structure.towers or patcher.copies or resume is not None):
        raise ValueError("embeds= is for language-model graphs without copies or resume")
    pixel_values = inputs.pixel_values
    if patcher.copies:
        inputs = _expand(inputs, patcher.copies)
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        kept[hook.name] = x

    results = [(f"{'vision.' if t == 'vision' else ''}blocks.{l}.attn.hook_result", keep)
               for t in structure.towers for l in range(structure.shapes[t].n_layers) if patcher.needs(t, "heads", l)]  # fmt: skip
    with model.hooks(fwd_hooks=list(fwd_hooks) + results):
        model.past_length = 0
        if resume is not None:
            return _language(model, inputs, patcher, kept, *_resumed(structure, patcher, resume))
        if embeds is None:
            if "vision" in structure.towers:
                features = _vision(model, inputs.pixel_values, patcher, kept)
            else:  # the plain run's image features, computed once for every copy
                features = model.encode_images(pixel_values).repeat(max(patcher.copies, 1), 1)
            embeds = model.embed_inputs(inputs.input_ids, features, inputs.image_token_mask())
        if "language" not in structure.towers:
            return model.run_language_model(embeds, inputs.attention_mask, inputs.position_ids)
        _add_inputs(model, patcher, structure, embeds, inputs)
        return _language(model, inputs, patcher, kept, embeds, 0)


def _language(model, inputs: VLMInput, patcher: _Patcher, kept: dict, resid: Tensor, start: int) -> Tensor:
    per_device: dict[torch.device, tuple] = {}
    q_len = resid.shape[1]
    plain = is_plain_causal(inputs.attention_mask, q_len)  # as the model's forward: SDPA's is_causal, no mask
    for block in model.blocks[start:]:
        device = block.ln1.weight.device
        if device not in per_device:
            rotary = model.rotary(inputs.position_ids.to(device), resid.dtype)
            per_device[device] = (rotary, None if plain else causal_mask(inputs.attention_mask.to(device), q_len, resid.dtype))
        rotary, mask = per_device[device]
        resid = _block(block, resid.to(device), patcher, "language", kept, rotary=rotary, mask=mask, causal=plain and q_len > 1)
    resid = patcher.patched(resid.to(model.ln_final.weight.device), "language", "logits", model.cfg.n_layers)[:, :, 0]
    return model.final_logits(resid)


def _resumed(structure: Structure, patcher: _Patcher, resume: tuple[int, Tensor, Sources]) -> tuple[Tensor, int]:
    layer, resid, clean = resume
    if structure.towers != ("language",):
        raise ValueError("resume is for language-model graphs")
    for group, span in enumerate(structure.sources):
        if span.layer < layer:  # the input and every earlier block: as in the clean run
            patcher.add(span.tower, span.key, span.layer, clean[group].expand(max(patcher.copies, len(clean[group])), -1, -1, -1))
    return resid.expand(max(patcher.copies, len(resid)), -1, -1), layer


def _vision(model, pixel_values: Tensor, patcher: _Patcher, kept: dict) -> Tensor:
    vision = model.vision
    if len(vision.feature_layers) != 1:
        raise NotImplementedError("a vision-tower graph needs a single feature layer (LLaVA-1.5 and InternVL read one)")
    resid = vision.embed(pixel_values.to(vision.patch_embed.weight.device))
    patcher.add("vision", "input", -1, resid[:, :, None])
    for block in vision.blocks:
        resid = _block(block, resid.to(block.ln1.weight.device), patcher, "vision", kept)
    resid = patcher.patched(resid, "projector", "projector", len(vision.blocks))[:, :, 0]
    features = vision.hook_features(resid[:, 1:] if vision.select_strategy == "default" else resid)
    features = model.projector(features.to(model.projector.linear_1.weight.device))
    return features.reshape(-1, features.shape[-1])


def _add_inputs(model, patcher: _Patcher, structure: Structure, embeds: Tensor, inputs: VLMInput) -> None:
    if "vision" not in structure.towers:
        patcher.add("language", "input", -1, embeds[:, :, None])
        return
    image = inputs.image_token_mask().to(embeds.device)[..., None]
    patcher.add("language", "input", -1, torch.where(image, 0.0, embeds)[:, :, None])
    patcher.add("projector", "projector", -1, torch.where(image, embeds, 0.0)[:, :, None])


def _block(block, resid: Tensor, patcher: _Patcher | _PlainPatcher, tower: str, kept: dict, **attn_kwargs) -> Tensor:
    """One transformer block with per-destination inputs (`TransformerBlock.forward`, split)."""
    layer = block.layer
    resid_pre = block.hook_resid_pre(resid)
    x = block.hook_attn_in(resid_pre)
    if isinstance(patcher, _PlainPatcher):
        q, k, v = (_projected(block, patcher.inputs(x, tower, key, layer), key) for key in ("q", "k", "v"))
        attn_out = block.attn.attend(q, k, v, layer=layer, **attn_kwargs)
    else:
        q, k, v = (block.ln1(patcher.patched(x, tower, key, layer)) for key in ("q", "k", "v"))
        attn_out = block.attn.forward_split(q, k, v, layer=layer, **attn_kwargs)
    heads = kept.pop(block.attn.hook_result.name, None)
    if block.layer_scale:
        attn_out = block.lambda_1 * attn_out
        heads = None if heads is None else block.lambda_1 * heads
    if heads is not None:
        patcher.add(tower, "heads", layer, heads)
    resid_mid = block.hook_resid_mid(resid_pre + block.hook_attn_out(attn_out))
    x = patcher.patched(block.hook_mlp_in(resid_mid), tower, "mlp", layer)[:, :, 0]
    mlp_out = block.mlp(block.ln2(x))
    if block.layer_scale:
        mlp_out = block.lambda_2 * mlp_out
    mlp_out = block.hook_mlp_out(mlp_out)
    patcher.add(tower, "mlp", layer, mlp_out[:, :, None])
    return block.hook_resid_post(resid_mid + mlp_out)


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


class _PlainPatcher:
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


class _Patcher:
    """Δ = corrupted − this run's output of every source so far, and the patched inputs (any
    weights: copies, spans, fractional or differentiated)."""

    def __init__(self, structure: Structure, weights: Tensor, corrupted: Sources, span_index: dict | None):
        self.structure, self.weights, self.corrupted = structure, weights, corrupted
        n = (structure.n_src, structure.n_dst)
        shape = tuple(weights.shape)
        if shape == n or (len(shape) == 3 and shape[1:] == n):
            self.has_spans = False
        elif shape[:2] == n and len(shape) == 3 or (len(shape) == 4 and shape[1:3] == n):
            self.has_spans = True
        else:
            raise ValueError(f"weights must be [copies?, {n[0]}, {n[1]}, spans?], got {shape}")
        self.copies = shape[0] if len(shape) == 3 + self.has_spans else 0
        if self.has_spans and span_index is None:
            raise ValueError("weights have a span axis: give span_index")
        self.span_index = span_index or {}
        self.deltas: dict[int, Tensor] = {}
        self.groups = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.sources)}
        self.dests = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.destinations)}

    @property
    def plain(self) -> bool:
        """No copies, spans or gradients: `_PlainPatcher` can serve these weights."""
        differentiated = self.weights.requires_grad or forward_ad.unpack_dual(self.weights).tangent is not None
        return not (self.copies or self.has_spans or differentiated or torch.is_grad_enabled())

    def needs(self, tower: str, key: str, layer: int) -> bool:
        return True

    def add(self, tower: str, key: str, layer: int, output: Tensor) -> None:
        group = self.groups[tower, key, layer]
        corrupted = self.corrupted[group].to(output.device)
        if len(corrupted) != len(output):  # copies of a batch-1 input (vision: its views, copy after copy)
            corrupted = corrupted.repeat(len(output) // len(corrupted), *([1] * (corrupted.dim() - 1)))
        dtype = accumulation_dtype(output.dtype)
        self.deltas[group] = corrupted.to(dtype) - output.to(dtype)

    def patched(self, x: Tensor, tower: str, key: str, layer: int) -> Tensor:
        """`[rows, pos, n_dst, d_model]`: the destinations' inputs, x plus their patches."""
        dst = self.dests[tower, key, layer]
        span = self.structure.destinations[dst]
        patch = self._patch(dst, x)
        if patch is None:
            return x[:, :, None].expand(-1, -1, len(span), -1)
        return (x[:, :, None].to(patch.dtype) + patch).to(x.dtype)

    def _patch(self, dst: int, x: Tensor) -> Tensor | None:
        span = self.structure.destinations[dst]
        patch = None
        for group in self.structure.parents[dst]:
            block = self._block(self.structure.sources[group].slice, span.slice)
            if block is None:
                continue
            space = "vision" if span.tower == "vision" or span.key == "projector" else "language"
            mixed = self._mix(self.deltas[group].to(x.device), block.to(x.device), space)
            patch = mixed if patch is None else patch + mixed
        return patch

    def _block(self, src: slice, dst: slice) -> Tensor | None:
        w = self.weights[..., src, dst, :] if self.has_spans else self.weights[..., src, dst]
        if not w.requires_grad and forward_ad.unpack_dual(w).tangent is None and not w.any():
            return None  # nothing patched, nothing differentiated (reverse or forward mode): skip
        return w.to(accumulation_dtype(w.dtype))

    def _mix(self, delta: Tensor, w: Tensor, tower: str) -> Tensor:
        rows, pos, n, d = delta.shape
        if not self.copies and not self.has_spans:
            return torch.einsum("rpud,uv->rpvd", delta.to(w.dtype), w)
        delta = delta.reshape(self.copies or rows, -1, n, d).to(w.dtype)  # vision: views of a copy side by side
        if not self.has_spans:  # copies: each patched its own way
            return torch.einsum("cpud,cuv->cpvd", delta, w).reshape(rows, pos, -1, d)
        w = w if self.copies else w[None]
        if tower not in self.span_index:
            raise ValueError(f"the pair's spans have no {tower}-tower positions")
        index = self.span_index[tower].reshape(-1, delta.shape[1]).to(w.device)
        by_position = w.permute(0, 3, 1, 2)[torch.arange(w.shape[0], device=w.device)[:, None], index]  # [r, p, u, v]
        out = torch.einsum("rpud,rpuv->rpvd", delta, by_position)
        return out.reshape(rows, pos, -1, d)


def _has_hooks(model) -> bool:
    """Whether a hook is attached to any hook point of `model` (`model.hooks`, `add_hook`)."""
    return any(hook.fwd_hooks or hook.bwd_hooks for hook in model.hook_dict.values())


def source_space(source) -> str:
    """The residual stream a source writes into (the projector: the language model's)."""
    return "vision" if source.tower == "vision" else "language"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision models (differences and sums of many terms lose digits in bf16),
    the model's own dtype when it is fp32 or fp64."""
    return torch.promote_types(dtype, torch.float32)


def _expand(inputs: VLMInput, copies: int) -> VLMInput:
    if len(inputs) != 1:
        raise ValueError(f"weights with copies patch copies of one input (batch 1), got a batch of {len(inputs)}")
    from dataclasses import replace

    repeat = lambda t: None if t is None else t.expand(copies, *t.shape[1:])  # noqa: E731
    layout = inputs.layout
    # copies of one row: every image token again at the same position in the next row
    batch = torch.arange(copies).repeat_interleave(len(layout))
    tiled = replace(layout, image_sizes=layout.image_sizes * copies, views=layout.views * copies,
                    image_batch_row=list(range(copies)), batch=batch, position=layout.position.repeat(copies),
                    image=torch.arange(copies).repeat_interleave(len(layout)), view=layout.view.repeat(copies),
                    row=layout.row.repeat(copies), col=layout.col.repeat(copies), box=layout.box.repeat(copies, 1))  # fmt: skip
    return replace(inputs, input_ids=repeat(inputs.input_ids), attention_mask=repeat(inputs.attention_mask),
                   position_ids=repeat(inputs.position_ids), pixel_values=inputs.pixel_values.repeat(copies, 1, 1, 1),
                   layout=tiled, answer_mask=repeat(inputs.answer_mask))  # fmt: skip


# ---------------------------------------------------------------------------------- recording
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
