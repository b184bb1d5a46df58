"""Hooked building blocks shared by both families and both towers."""

from hooked_vlm.components.attention import Attention, KVCache, RotaryEmbedding
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.moe import MoEMLP
from hooked_vlm.components.norms import LayerNorm, RMSNorm, make_norm

__all__ = ["Attention", "KVCache", "RotaryEmbedding", "TransformerBlock", "MLP", "MoEMLP", "LayerNorm", "RMSNorm", "make_norm"]
