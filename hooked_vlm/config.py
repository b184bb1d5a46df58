"""Configuration: one dataclass per transformer stack, one for the whole VLM.

Field names follow TransformerLens (`n_layers`, `d_model`, `n_heads`, `d_head`, `d_mlp`,
`n_key_value_heads`, `d_vocab`, `normalization_type`, `act_fn`, ...), so a TransformerLens user
needs no new vocabulary. `HookedVLMConfig` forwards unknown attributes to the language model's
config, so that `model.cfg.n_layers` is the language model's depth, as transformer_lens's
`ActivationCache` helpers expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

Family = Literal["llava", "internvl"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point `torch.dtype`, given as one or by name ("bfloat16", "bf16", "float16", ...)."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        name = _DTYPE_ALIASES.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of {sorted(DTYPES | _DTYPE_ALIASES)}")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or its name, got {dtype!r}")
    return dtype


@dataclass
class TransformerConfig:
    """Everything a stack of pre-norm transformer blocks needs (vision tower or language model)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_key_value_heads: int | None = None  # None: multi-head attention (= n_heads)
    act_fn: Literal["gelu", "quick_gelu", "silu"] = "gelu"
    gated_mlp: bool = False
    normalization_type: Literal["LN", "RMS"] = "LN"
    eps: float = 1e-5
    attn_bias: bool = False  # bias on q/k/v projections
    attn_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: Literal["head", "full"] | None = None  # RMSNorm of q and k, per head or over the full width
    qk_norm_eps: float = 1e-6
    positional_embedding_type: Literal["rotary", "learned"] = "learned"
    rotary_base: float = 10000.0
    causal: bool = False
    softmax_in_fp32: bool = True  # InternViT's eager softmax runs in the activation dtype
    layer_scale: bool = False  # InternViT: per-channel scale of each branch output
    d_vocab: int | None = None  # language model only
    # Mixture of experts (Qwen3-MoE, TransformerLens's names): every MLP not in `dense_mlp_layers`
    # routes each token to `experts_per_token` of `num_experts` gated MLPs of width `d_mlp`;
    # the dense layers' MLPs are `d_mlp_dense` wide. `norm_topk_prob`: renormalise the selected
    # experts' router probabilities to sum to 1.
    num_experts: int | None = None
    experts_per_token: int | None = None
    norm_topk_prob: bool = False
    dense_mlp_layers: tuple[int, ...] = ()
    d_mlp_dense: int | None = None
    # vision tower only
    image_size: int | None = None
    patch_size: int | None = None
    n_channels: int = 3
    patch_bias: bool = False  # CLIP's patch conv has no bias, InternViT's has
    ln_pre: bool = False  # CLIP normalises the embeddings before the first block
    dtype: torch.dtype = torch.float32
    attn_only: bool = False  # for transformer_lens helpers; always False here

    def __post_init__(self) -> None:
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})"
            )
        if self.num_experts is not None:
            self._check_experts()

    def _check_experts(self) -> None:
        if not self.gated_mlp:
            raise ValueError("mixture-of-experts MLPs are gated (gated_mlp=True)")
        if not 1 <= (self.experts_per_token or 0) <= self.num_experts:
            raise ValueError(f"experts_per_token must be in 1..num_experts ({self.num_experts}), got {self.experts_per_token}")
        self.dense_mlp_layers = tuple(sorted(set(self.dense_mlp_layers)))
        if self.dense_mlp_layers and self.d_mlp_dense is None:
            raise ValueError(f"dense_mlp_layers {list(self.dense_mlp_layers)} need their width d_mlp_dense")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer`'s MLP is a mixture of experts."""
        return self.num_experts is not None and layer not in self.dense_mlp_layers

    @property
    def n_grid(self) -> int:
        """Patches per side of the vision tower's input (vision towers only)."""
        assert self.image_size is not None and self.patch_size is not None
        return self.image_size // self.patch_size


@dataclass
class HookedVLMConfig:
    """A whole vision-language model: vision tower -> projector -> language model."""

    family: Family
    vision: TransformerConfig
    text: TransformerConfig
    image_token_id: int
    # Indices into the tower's hidden-states tuple (0 = embeddings, L = last block's output),
    # already made non-negative. Only blocks up to max(feature_layers) are built and run.
    feature_layers: tuple[int, ...]
    vision_n_layers_checkpoint: int  # blocks in the checkpoint; later ones are never read
    feature_select_strategy: Literal["default", "full"] = "default"  # "default" drops CLS
    projector_act_fn: str = "gelu"
    projector_bias: bool = True
    downsample_ratio: float | None = None  # InternVL pixel shuffle; None for LLaVA
    projector_ln_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    checkpoint_format: str = ""  # e.g. "llava-hf", "llava-original", "internvl-hf", "internvl-original"
    extra: dict = field(default_factory=dict)  # family-specific preprocessing settings
    # Not a field: transformer_lens helpers allocate their results on `cfg.device`
    # (`transformer_lens.patching`); a VLM may span devices (device_map), so None: torch's default
    # device. The model's own device is `model.device`.
    device = None

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: forward to the language model's config so that
        # transformer_lens helpers (cfg.n_layers, cfg.n_heads, ...) see the language model.
        if name.startswith("__") or name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def n_feature_layers(self) -> int:
        return len(self.feature_layers)

    @property
    def d_vision_features(self) -> int:
        """Width of what the projector reads (per token, before pixel shuffle)."""
        return self.vision.d_model * len(self.feature_layers)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    def with_dtype(self, dtype: torch.dtype) -> HookedVLMConfig:
        return replace(self, vision=replace(self.vision, dtype=dtype), text=replace(self.text, dtype=dtype))


def config_fields(cfg: TransformerConfig) -> dict:
    """The config as a plain dict (for printing and comparing)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
