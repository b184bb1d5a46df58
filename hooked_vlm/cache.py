"""transformer_lens's `ActivationCache`, taught two facts about a vision-language model.

1. The residual stream starts at `hook_inputs_embeds` (text embeddings with the image features
   written in), not at `hook_embed`: `decompose_resid` uses it as its first term, so the terms
   sum to the residual stream at every position, image tokens included.
2. The norms here are Hugging Face's fused ones and expose no `hook_scale`; the scale that
   `apply_ln=True` needs is recomputed from the cached residual stream instead.

Everything else is transformer_lens's own code.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice


class VLMActivationCache(ActivationCache):
    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream entering `layer` (its MLP if `mlp_input`) as a stack of
        `inputs_embeds` and every earlier attention and MLP output; the stack sums to it."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        components, labels = [], []
        if incl_embeds:
            components.append(self["hook_inputs_embeds"])
            labels.append("inputs_embeds")
        for l in range(layer):
            if mode != "mlp":
                components.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                components.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            components.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        if not components:
            raise ValueError("nothing to decompose: no embeddings and no layers selected")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None) -> torch.Tensor:
        """RMS of the norm's cached input (plus eps), `[batch, pos, 1]`: what the norm divides by."""
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == n_layers:
            resid, norm = self[f"blocks.{n_layers - 1}.hook_resid_post"], self.model.ln_final
        else:
            block = self.model.blocks[layer]
            resid = self[f"blocks.{layer}.hook_resid_{'mid' if mlp_input else 'pre'}"]
            norm = block.ln2 if mlp_input else block.ln1
        resid32 = resid.float()
        if self.model.cfg.normalization_type == "LN":
            resid32 = resid32 - resid32.mean(-1, keepdim=True)
        scale = (resid32.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt().to(resid.dtype)
        scale = pos_slice.apply(scale, dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale
