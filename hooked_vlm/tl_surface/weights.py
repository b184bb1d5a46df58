"""TransformerLens's weight views, stacked over layers: `W_Q` `[layer, head, d_model, d_head]` ...

The weights are stored fused, as Hugging Face stores them; each block's `attn` and `mlp` already
expose TransformerLens-shaped per-layer views (`blocks[l].attn.W_Q`, `blocks[l].mlp.W_in`). These
mixins stack them, for the language model (`model.W_Q`) and the vision tower (`model.vision.W_Q`).

Two facts a TransformerLens user should know:
- Nothing is folded. TransformerLens folds each norm's weight into the next matrix by default;
  here `W_Q` is the raw query projection, to be applied to `ln1.hook_normalized` (the norm's
  output, weight included), and InternViT's layer scale (`lambda_1`, `lambda_2`) multiplies the
  branch output after `W_O` / `W_out`.
- `QK` and `OV` are bilinear forms of the weights alone: rotary and Qwen3's per-head q/k norm
  act between `W_Q`/`W_K` and the scores, so `QK` is not the score of two residual vectors there.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix


def _stacked(views: list[Tensor]) -> Tensor:
    """One tensor over layers, on the first layer's device (a model spread over devices by
    `device_map` keeps each block's weights where the block runs)."""
    return torch.stack([view.to(views[0].device) for view in views])


class StackedWeights:
    """Weight views of a stack of `TransformerBlock`s in `self.blocks` (grouped-query heads
    repeated per query head, as TransformerLens's GQA views: query head h reads key/value head
    h // (n_heads // n_key_value_heads)). Absent biases are zeros, as in TransformerLens."""

    def _stack_attn(self, name: str) -> Tensor:
        return _stacked([getattr(block.attn, name) for block in self.blocks])

    def _mlp_views(self, name: str) -> list:
        views = []
        for block in self.blocks:
            mlp = block.mlp
            if not hasattr(type(mlp), name):
                # NotImplementedError, not AttributeError: nn.Module.__getattr__ would replace an
                # AttributeError raised in a property by its own "has no attribute" message
                params = sorted({n.split(".")[0] for n, _ in mlp.named_parameters()})
                raise NotImplementedError(
                    f"blocks.{block.layer}.mlp is a {type(mlp).__name__}, which has no single {name}: "
                    f"read its own weights ({', '.join(params)}), e.g. per expert"
                )
            views.append(getattr(mlp, name))
        return views

    def _stack_mlp(self, name: str) -> Tensor:
        return _stacked(self._mlp_views(name))

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stack_attn("W_O")

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack_attn("b_Q")

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack_attn("b_K")

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack_attn("b_V")

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stack_attn("b_O")

    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        """The input projection (`up_proj`; TransformerLens's `W_in` of a gated MLP too)."""
        return self._stack_mlp("W_in")

    @property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"] | None:
        """The gate projection of a gated MLP (Llama, Qwen3); None for a plain MLP, as in TransformerLens."""
        if not self.blocks[0].mlp.cfg.gated_mlp:
            return None
        return self._stack_mlp("W_gate")

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return self._stack_mlp("W_out")

    @property
    def b_in(self) -> Float[Tensor, "layer d_mlp"]:
        return self._mlp_bias("b_in", "d_mlp")

    @property
    def b_out(self) -> Float[Tensor, "layer d_model"]:
        return self._mlp_bias("b_out", "d_model")

    def _mlp_bias(self, name: str, width: str) -> Tensor:
        biases = self._mlp_views(name)
        size = getattr(self.blocks[0].mlp.cfg, width)
        weight = self.blocks[0].mlp.down_proj.weight  # for the dtype and device of absent biases
        return _stacked([torch.zeros(size, dtype=weight.dtype, device=weight.device) if b is None else b for b in biases])

    @property
    def QK(self) -> FactoredMatrix:
        """`W_Q @ W_K^T` per layer and query head, `[layer, head, d_model, d_model]`, factored."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """`W_V @ W_O` per layer and query head, `[layer, head, d_model, d_model]`, factored."""
        return FactoredMatrix(self.W_V, self.W_O)


class LanguageModelWeights(StackedWeights):
    """The language model's embedding and unembedding views (`HookedVLM` has `embed`,
    `unembed`, `ln_final` and `blocks` at its top level)."""

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.b_U

    @property
    def W_pos(self) -> Tensor:
        raise NotImplementedError(
            "the language model encodes positions with rotary embeddings, so it has no W_pos matrix; "
            "the vision tower's learned one is model.vision.W_pos"
        )

    def tokens_to_residual_directions(self, tokens: int | str | Tensor) -> Float[Tensor, "... d_model"]:
        """Each token's unembedding direction, `W_U[:, token]`, as TransformerLens's: it reads the
        final norm's output, which is what the cache's `apply_ln=True` stacks are here (the norm's
        weight included, nothing being folded), so `cache.logit_attrs` and a logit lens over
        `accumulated_resid(apply_ln=True)` sum to the logits. A string must be one token."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.W_U[:, torch.as_tensor(tokens, device=self.W_U.device)].movedim(0, -1)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """The sum of the attention-output (and MLP-output) biases of the language model's blocks
        before `layer` (and layer's attention, with `mlp_input`), as TransformerLens's; zero for
        Llama and Qwen3, which have none."""
        total = torch.zeros(self.cfg.text.d_model, dtype=self.dtype, device=self.device)
        for block in self.blocks[: layer + int(mlp_input)]:
            total = total + block.attn.b_O.to(total.device)
        for block in self.blocks[:layer] if include_mlp_biases else []:
            bias = getattr(block.mlp, "b_out", None)  # a mixture of experts has none
            if bias is not None:
                total = total + bias.to(total.device)
        return total


class VisionTowerWeights(StackedWeights):
    """The vision tower's input views: its "embedding" is the patch convolution."""

    @property
    def W_E(self) -> Float[Tensor, "patch_pixels d_model"]:
        """The patch embedding as a matrix: a flattened patch, channel-major then row-major
        (`[channel, row, col]`, the convolution's order), times `W_E` (plus the conv's bias, if
        any) is the patch's embedding in `hook_patch_embed`."""
        return einops.rearrange(self.patch_embed.weight, "d c h w -> (c h w) d")

    @property
    def W_pos(self) -> Float[Tensor, "pos d_model"]:
        """The learned position embeddings, position 0 being CLS and `1 + r * n_grid + c` patch (r, c)."""
        return self.pos_embed
