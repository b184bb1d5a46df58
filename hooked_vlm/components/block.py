"""The pre-norm transformer block shared by every tower, with optional layer scale."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention, KVCache
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.moe import MoEMLP
from hooked_vlm.components.norms import make_norm
from hooked_vlm.config import TransformerConfig


class TransformerBlock(nn.Module):
    """`resid_mid = resid_pre + attn(ln1(resid_pre))`, `resid_post = resid_mid + mlp(ln2(resid_mid))`.

    With `layer_scale` (InternViT) each branch output is multiplied by a learned per-channel vector
    (`lambda_1`, `lambda_2`) *before* the residual add; `hook_attn_out`/`hook_mlp_out` see the scaled
    branch, so `resid_pre + attn_out == resid_mid` always holds.
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_scale = cfg.layer_scale
        # registered in forward order, so that `model.hook_dict` lists hooks as data flows
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in = HookPoint()
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps, cfg.dtype)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps, cfg.dtype)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer) else MLP(cfg, cfg.d_mlp_dense if cfg.num_experts else None)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.layer_scale:
            self.lambda_1 = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
            self.lambda_2 = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(self.ln1(self.hook_attn_in(resid_pre)), rotary=rotary, mask=mask, causal=causal, kv_cache=kv_cache, layer=self.layer)
        if self.layer_scale:
            attn_out = self.lambda_1 * attn_out
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(self.hook_mlp_in(resid_mid)))
        if self.layer_scale:
            mlp_out = self.lambda_2 * mlp_out
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))
