"""The projector from vision features to language-model embeddings.

LLaVA: `linear_2(gelu(linear_1(x)))`. InternVL: pixel shuffle (2x2 neighbouring tokens merged into
one, channels x4), then `LayerNorm`, then the same two-layer MLP.
"""

from __future__ import annotations

import einops
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components import LayerNorm
from hooked_vlm.components.mlp import activation


def pixel_shuffle(x: Float[Tensor, "view token d"], ratio: float) -> Float[Tensor, "view merged_token d_merged"]:
    """InternVL's pixel shuffle (`ps_version` v2) for `ratio = 0.5`.

    Output token (i, j) of the 16x16 grid, row-major, holds input tokens (2i+dr, 2j+dc) with channel
    index `dr*2D + dc*D + d`: row parity outer, then column parity (pitfall 9). Swapping them (v1)
    transposes the image.
    """
    k = round(1 / ratio)
    side = round(x.shape[1] ** 0.5)
    if side * side != x.shape[1] or side % k:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {k}, got {x.shape[1]} tokens")
    return einops.rearrange(x, "n (i dr j dc) d -> n (i j) (dr dc d)", i=side // k, dr=k, dc=k)


class Projector(nn.Module):
    """Hooks: `hook_pixel_shuffle` (InternVL), `ln.hook_normalized` (InternVL), `hook_hidden`
    (after the activation), `hook_out` (image features in the language model's embedding space)."""

    def __init__(
        self,
        d_in: int,
        d_model: int,
        act_fn: str,
        bias: bool,
        dtype,
        downsample_ratio: float | None = None,
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        self.downsample_ratio = downsample_ratio
        if downsample_ratio is not None:
            d_in = d_in * round(1 / downsample_ratio) ** 2
            self.hook_pixel_shuffle = HookPoint()
            # InternVL's projector LayerNorm uses PyTorch's default eps 1e-5, not the ViT's 1e-6
            self.ln = LayerNorm(d_in, ln_eps, dtype)
        self.linear_1 = nn.Linear(d_in, d_model, bias=bias, dtype=dtype)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(d_model, d_model, bias=bias, dtype=dtype)
        self.hook_hidden = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[Tensor, "view token d_features"]) -> Float[Tensor, "view image_token d_model"]:
        x = features
        if self.downsample_ratio is not None:
            x = self.ln(self.hook_pixel_shuffle(pixel_shuffle(x, self.downsample_ratio)))
        hidden = self.hook_hidden(self.act(self.linear_1(x)))
        return self.hook_out(self.linear_2(hidden))
