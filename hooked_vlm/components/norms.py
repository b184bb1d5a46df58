"""Hooked normalisation layers, numerically identical to the Hugging Face modules they replace."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` with a hook on its output.

    `hook_normalized` is the norm's full output (after weight and bias): the tensor the next
    component reads. Parameters keep the PyTorch names `weight` and `bias`.
    """

    def __init__(self, d_model: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.hook_normalized = HookPoint()  # [..., d_model]

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.hook_normalized(F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps))


class RMSNorm(nn.Module):
    """RMSNorm as in Llama, Qwen3 and InternViT-6B.

    The statistics are computed in fp32 and the result is cast back to the input dtype *before*
    the weight is applied (ARCHITECTURES §0.1); multiplying in fp32 changes bf16 results.
    """

    def __init__(self, d_model: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, dtype=dtype))
        self.hook_normalized = HookPoint()  # [..., d_model]

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for half precision; fp64 stays fp64
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * x32.to(x.dtype))


def make_norm(kind: str, d_model: int, eps: float, dtype: torch.dtype) -> LayerNorm | RMSNorm:
    """`kind` is TransformerLens's `normalization_type`: "LN" or "RMS"."""
    if kind == "LN":
        return LayerNorm(d_model, eps, dtype)
    if kind == "RMS":
        return RMSNorm(d_model, eps, dtype)
    raise ValueError(f"unknown normalization_type {kind!r} (expected 'LN' or 'RMS')")
