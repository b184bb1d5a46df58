"""transformer_lens's `ActivationCache`, taught two facts about a vision-language model.

1. The residual stream starts at `hook_inputs_embeds` (text embeddings with the image features
   written in), not at `hook_embed`: `decompose_resid` and `get_full_resid_decomposition` use it
   as their embedding term, so the terms sum to the residual stream at every position, image
   tokens included.
2. The norms here are Hugging Face's fused ones and expose no `hook_scale`; the scale that
   `apply_ln=True` needs is recomputed from the cached residual stream instead.
3. Nothing is folded: a norm's weight stays in the norm, not in `W_U`, `W_Q` ... So `apply_ln=True`
   applies the norm as the model does, scale and weight: a stack composes with the raw matrices
   (`@ model.W_U`, `@ model.tokens_to_residual_directions(t)`, `@ model.W_Q[l]`) as the norm's
   output does. (TransformerLens divides by the scale only, its weights being folded.)

Everything else is transformer_lens's own code.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from hooked_vlm.components.moe import MoEMLP


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

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ):
        """TransformerLens's (heads, MLP outputs or neurons, embeddings, biases), whose embedding
        term is `hook_inputs_embeds` (labelled "inputs_embeds"), as in `decompose_resid`: its
        `hook_embed` lacks the image features, so the parts would not sum to the residual stream."""
        if expand_neurons and any(isinstance(block.mlp, MoEMLP) for block in self.model.blocks[:layer]):
            raise ValueError(
                "expand_neurons=True splits each MLP into its neurons, but a mixture-of-experts MLP has a set of "
                "neurons per expert (see mlp.hook_expert_out and mlp.expert): pass expand_neurons=False"
            )
        # TransformerLens reads self["hook_embed"]: lend it the right tensor for this call only
        kept, had_embed = self.cache_dict.get("hook_embed"), self.has_embed
        self.cache_dict["hook_embed"], self.has_embed = self["hook_inputs_embeds"], True
        try:
            stack, labels = super().get_full_resid_decomposition(
                layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels=True, project_output_onto=project_output_onto
            )
        finally:
            self.has_embed = had_embed
            if kept is None:
                del self.cache_dict["hook_embed"]
            else:
                self.cache_dict["hook_embed"] = kept
        labels = ["inputs_embeds" if label == "embed" else label for label in labels]
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """TransformerLens's, then the norm's weight (fact 3 above). With `recompute_ln` at the
        unembed (the logit lens of `accumulated_resid(apply_ln=True)`), each component is divided
        by its own scale. A norm's bias is a constant of the sum: no component carries it."""
        final = layer is None or layer in (-1, self.model.cfg.n_layers)
        if recompute_ln and final:
            batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
            stack = batch_slice.apply(residual_stack, dim=1) if has_batch_dim else residual_stack
            stack = stack / self._scale(stack, self.model.ln_final.eps)
        else:
            stack = super().apply_ln_to_stack(residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim)
        weight = self._norm(None if final else layer, mlp_input).weight
        return stack * weight.to(stack.device)

    def _stack_neuron_results_apply_ln_projected(self, layer, pos_slice, neuron_slice, project_2d, mlp_input=False) -> torch.Tensor:
        """TransformerLens's shortcut for `stack_neuron_results(apply_ln=True, project_output_onto=p)`,
        which reads the cached scale and not `apply_ln_to_stack`: the norm's weight goes into `p`."""
        weight = self._norm(None if layer == -1 else layer, mlp_input).weight
        return super()._stack_neuron_results_apply_ln_projected(
            layer, pos_slice, neuron_slice, weight.to(project_2d.device, project_2d.dtype)[:, None] * project_2d, mlp_input
        )

    def _norm(self, layer: int | None, mlp_input: bool) -> torch.nn.Module:
        if layer is None or layer == self.model.cfg.n_layers:
            return self.model.ln_final
        return self.model.blocks[layer].ln2 if mlp_input else self.model.blocks[layer].ln1

    def _scale(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """What the norm divides `x` by: its RMS (after centring, for LayerNorm) plus eps, `[..., 1]`."""
        x32 = x.float()
        if self.model.cfg.normalization_type == "LN":
            x32 = x32 - x32.mean(-1, keepdim=True)
        return (x32.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None) -> torch.Tensor:
        """The scale of the norm's cached input, `[batch, pos, 1]`: what the norm divides by."""
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == n_layers:
            resid = self[f"blocks.{n_layers - 1}.hook_resid_post"]
        else:
            resid = self[f"blocks.{layer}.hook_resid_{'mid' if mlp_input else 'pre'}"]
        scale = self._scale(resid, self._norm(layer, mlp_input).eps)
        scale = pos_slice.apply(scale, dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale
