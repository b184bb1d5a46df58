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

A plain evaluation (no copies, spans or gradients) computes only what the weights change:
`hooked_vlm.circuits.plain`. What is read from the corrupted run is `hooked_vlm.circuits.sources`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.circuits.plain import PlainPatcher
from hooked_vlm.circuits.sources import Sources, accumulation_dtype, has_hooks
from hooked_vlm.circuits.structure import Structure
from hooked_vlm.components.attention import causal_mask, is_plain_causal
from hooked_vlm.inputs import VLMInput


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
    patcher = _patcher(model, structure, weights, corrupted, span_index, fwd_hooks)
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


def _patcher(model, structure: Structure, weights: Tensor, corrupted: Sources, span_index, fwd_hooks) -> _Patcher | PlainPatcher:
    """The general patcher, or for a plain evaluation (no copies, spans or gradients) the one that
    computes only what the weights change, from the other run's streams unless a hook could edit them."""
    copies, has_spans = _weight_layout(structure, weights)
    differentiated = weights.requires_grad or forward_ad.unpack_dual(weights).tangent is not None
    if copies or has_spans or differentiated or torch.is_grad_enabled():
        return _Patcher(structure, weights, corrupted, span_index)
    use_streams = bool(getattr(corrupted, "streams", None)) and not fwd_hooks and not has_hooks(model)
    return PlainPatcher(structure, weights, corrupted, use_streams)


def _weight_layout(structure: Structure, weights: Tensor) -> tuple[int, bool]:
    """(copies, whether there is a span axis) of `[copies?, n_src, n_dst, spans?]` weights."""
    n = (structure.n_src, structure.n_dst)
    shape = tuple(weights.shape)
    if shape == n or (len(shape) == 3 and shape[1:] == n):
        has_spans = False
    elif shape[:2] == n and len(shape) == 3 or (len(shape) == 4 and shape[1:3] == n):
        has_spans = True
    else:
        raise ValueError(f"weights must be [copies?, {n[0]}, {n[1]}, spans?], got {shape}")
    return (shape[0] if len(shape) == 3 + has_spans else 0), has_spans


def _language(model, inputs: VLMInput, patcher: _Patcher | PlainPatcher, kept: dict, resid: Tensor, start: int) -> Tensor:
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


def _resumed(structure: Structure, patcher: _Patcher | PlainPatcher, resume: tuple[int, Tensor, Sources]) -> tuple[Tensor, int]:
    layer, resid, clean = resume
    if structure.towers != ("language",):
        raise ValueError("resume is for language-model graphs")
    for group, span in enumerate(structure.sources):
        if span.layer < layer:  # the input and every earlier block: as in the clean run
            patcher.add(span.tower, span.key, span.layer, clean[group].expand(max(patcher.copies, len(clean[group])), -1, -1, -1))
    return resid.expand(max(patcher.copies, len(resid)), -1, -1), layer


def _vision(model, pixel_values: Tensor, patcher: _Patcher | PlainPatcher, kept: dict) -> Tensor:
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


def _add_inputs(model, patcher: _Patcher | PlainPatcher, structure: Structure, embeds: Tensor, inputs: VLMInput) -> None:
    if "vision" not in structure.towers:
        patcher.add("language", "input", -1, embeds[:, :, None])
        return
    image = inputs.image_token_mask().to(embeds.device)[..., None]
    patcher.add("language", "input", -1, torch.where(image, 0.0, embeds)[:, :, None])
    patcher.add("projector", "projector", -1, torch.where(image, embeds, 0.0)[:, :, None])


def _block(block, resid: Tensor, patcher: _Patcher | PlainPatcher, tower: str, kept: dict, **attn_kwargs) -> Tensor:
    """One transformer block with per-destination inputs (`TransformerBlock.forward`, split)."""
    layer = block.layer
    resid_pre = block.hook_resid_pre(resid)
    x = block.hook_attn_in(resid_pre)
    attn_out = patcher.attention(block, x, tower, layer, **attn_kwargs)
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


class _Patcher:
    """Δ = corrupted − this run's output of every source so far, and the patched inputs (any
    weights: copies, spans, fractional or differentiated)."""

    def __init__(self, structure: Structure, weights: Tensor, corrupted: Sources, span_index: dict | None):
        self.structure, self.weights, self.corrupted = structure, weights, corrupted
        self.copies, self.has_spans = _weight_layout(structure, weights)
        if self.has_spans and span_index is None:
            raise ValueError("weights have a span axis: give span_index")
        self.span_index = span_index or {}
        self.deltas: dict[int, Tensor] = {}
        self.groups = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.sources)}
        self.dests = {(s.tower, s.key, s.layer): i for i, s in enumerate(structure.destinations)}

    def needs(self, tower: str, key: str, layer: int) -> bool:
        return True

    def attention(self, block, x: Float[Tensor, "rows pos d_model"], tower: str, layer: int, **attn_kwargs) -> Tensor:
        """The block's attention output, each head's query, key and value normalising its own input."""
        q, k, v = (block.ln1(self.patched(x, tower, key, layer)) for key in ("q", "k", "v"))
        return block.attn.forward_split(q, k, v, layer=layer, **attn_kwargs)

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
