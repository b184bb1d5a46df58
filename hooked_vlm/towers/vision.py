"""The vision tower: patch embedding -> (CLIP: ln_pre) -> blocks -> the features the projector reads.

Serves CLIP (LLaVA) and InternViT (InternVL). Only the blocks up to the deepest selected feature
layer are built and run: later blocks cannot affect the output, so they get no hooks.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components import LayerNorm, TransformerBlock
from hooked_vlm.config import TransformerConfig
from hooked_vlm.tl_surface import VisionTowerSurface


class VisionTower(VisionTowerSurface, nn.Module):
    """Hooks: `hook_patch_embed` `[view, patch, d_model]` (conv output, row-major over the grid),
    `hook_pos_embed` `[1, 1 + patch, d_model]`, `hook_embed` (CLS + patches + positions),
    `ln_pre.hook_normalized` (CLIP), the blocks' hooks, and `hook_features`: the selected hidden
    states, CLS dropped under the "default" strategy, concatenated over feature layers on the
    channel axis — exactly what the projector reads.
    """

    def __init__(self, cfg: TransformerConfig, feature_layers: tuple[int, ...], select_strategy: str):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {select_strategy!r} (expected 'default' or 'full')")
        if cfg.n_layers != max(feature_layers):
            raise ValueError(f"the tower runs {cfg.n_layers} blocks but the deepest feature layer is {max(feature_layers)}")
        self.cfg = cfg
        self.feature_layers = feature_layers
        self.select_strategy = select_strategy
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(
            cfg.n_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias, dtype=cfg.dtype
        )
        self.cls_token = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_grid**2 + 1, d, dtype=cfg.dtype))
        self.hook_patch_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_embed = HookPoint()
        if cfg.ln_pre:
            self.ln_pre = LayerNorm(d, cfg.eps, cfg.dtype)
        self.blocks = nn.ModuleList([TransformerBlock(cfg, layer) for layer in range(cfg.n_layers)])
        self.hook_features = HookPoint()

    def embed(self, pixel_values: Float[Tensor, "view channel height width"]) -> Float[Tensor, "view token d_model"]:
        """The residual stream entering the first block: CLS + patches + positions (CLIP: then `ln_pre`)."""
        n, _, height, width = pixel_values.shape
        if height != self.cfg.image_size or width != self.cfg.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width} but the vision tower takes {self.cfg.image_size}x{self.cfg.image_size}"
            )
        # Both references cast pixels to the conv weight's dtype first (pitfall 20)
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        patches = self.hook_patch_embed(patches)
        # Under a device map the tower's parts may sit on several devices: each activation moves
        # to the device of the module it enters
        cls = self.cls_token.to(patches.device).expand(n, 1, -1)
        pos_embed = self.hook_pos_embed(self.pos_embed[None].to(patches.device))
        embed = self.hook_embed(torch.cat([cls, patches], dim=1) + pos_embed)
        return self.ln_pre(embed.to(self.ln_pre.weight.device)) if self.cfg.ln_pre else embed

    @property
    def n_tokens(self) -> int:
        """Tokens per view in `hook_features`."""
        return self.cfg.n_grid**2 + (self.select_strategy == "full")

    def forward(self, pixel_values: Float[Tensor, "view channel height width"]) -> Float[Tensor, "view token d_features"]:
        resid = self.embed(pixel_values)
        hidden_states = {0: resid}  # index k = input of block k = output of block k-1 (HF hidden_states[k])
        for block in self.blocks:
            resid = block(resid.to(block.ln1.weight.device))
            hidden_states[block.layer + 1] = resid
        selected = [hidden_states[k].to(resid.device) for k in self.feature_layers]
        if self.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return self.hook_features(torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0])
