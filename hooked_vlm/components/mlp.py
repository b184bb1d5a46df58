"""One hooked MLP: plain (`down(act(up(x)))`, CLIP, InternViT) or gated (`down(act(gate(x)) * up(x))`,
Llama, Qwen3)."""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.config import TransformerConfig


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # the erf form; never the tanh approximation (pitfall 4)


ACTIVATIONS = {"gelu": exact_gelu, "quick_gelu": quick_gelu, "silu": F.silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Hooks: `hook_pre` (the activation's input: `gate(x)` when gated, else `up(x)`),
    `hook_pre_linear` (`up(x)`, gated only), `hook_post` (what `down_proj` reads), all
    `[batch, pos, d_mlp]`. TransformerLens views: `W_in`, `W_gate`, `W_out`, `b_in`, `b_out`.
    `d_mlp` overrides `cfg.d_mlp` (the dense layers of a mixture-of-experts stack)."""

    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.act = activation(cfg.act_fn)
        d_mlp = d_mlp or cfg.d_mlp
        if cfg.gated_mlp:
            self.gate_proj = nn.Linear(cfg.d_model, d_mlp, bias=cfg.mlp_bias, dtype=cfg.dtype)
        self.up_proj = nn.Linear(cfg.d_model, d_mlp, bias=cfg.mlp_bias, dtype=cfg.dtype)
        self.hook_pre = HookPoint()
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()
        self.down_proj = nn.Linear(d_mlp, cfg.d_model, bias=cfg.mlp_bias, dtype=cfg.dtype)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.gated_mlp:
            pre = self.hook_pre(self.gate_proj(x))
            post = self.hook_post(self.act(pre) * self.hook_pre_linear(self.up_proj(x)))
        else:
            post = self.hook_post(self.act(self.hook_pre(self.up_proj(x))))
        return self.down_proj(post)

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return einops.rearrange(self.up_proj.weight, "f m -> m f")

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return einops.rearrange(self.gate_proj.weight, "f m -> m f")

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return einops.rearrange(self.down_proj.weight, "m f -> f m")

    @property
    def b_in(self) -> Tensor | None:
        return self.up_proj.bias

    @property
    def b_out(self) -> Tensor | None:
        return self.down_proj.bias
