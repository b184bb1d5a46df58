"""The full-size Hugging Face configs (no weights), to build models on the meta device."""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PreTrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

# ------------------------------------------------------------------------------- real configs


def _llava_real(d_model: int, d_mlp: int, n_layers: int, n_heads: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_heads, vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576, tie_word_embeddings=False,
    )  # fmt: skip


def _internvl_real(
    vision_variant: str, d_model: int, d_mlp: int, n_layers: int, n_heads: int, n_kv_heads: int = 8, d_expert: int | None = None
) -> InternVLConfig:
    """`d_expert`: a Qwen3-MoE LM (128 experts of that width, top-8, renormalised, every layer
    sparse: decoder_sparse_step 1, mlp_only_layers []), as Qwen3-30B-A3B / -235B-A22B."""
    shared = dict(layer_norm_eps=1e-6, image_size=448, patch_size=14, hidden_act="gelu")
    if vision_variant == "300m":
        vision = InternVLVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            attention_bias=True, use_qk_norm=False, norm_type="layer_norm", **shared,
        )  # fmt: skip
    else:
        vision = InternVLVisionConfig(
            hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
            attention_bias=False, use_qk_norm=True, norm_type="rms_norm", **shared,
        )  # fmt: skip
    moe = dict(
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=d_expert, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    ) if d_expert else {}  # fmt: skip
    text = (Qwen3MoeConfig if d_expert else Qwen3Config)(
        **moe,
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=40960,
        use_sliding_window=False, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=151671, image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip


_REAL_CONFIGS: dict[str, Callable[[], PreTrainedConfig]] = {
    "llava-1.5-7b": lambda: _llava_real(4096, 11008, 32, 32),
    "llava-1.5-13b": lambda: _llava_real(5120, 13824, 40, 40),
    "internvl3.5-1b": lambda: _internvl_real("300m", 1024, 3072, 28, 16),
    "internvl3.5-8b": lambda: _internvl_real("300m", 4096, 12288, 36, 32),
    "internvl3.5-38b": lambda: _internvl_real("6b", 5120, 25600, 64, 64),
    # mixture of experts (Qwen3-30B-A3B and Qwen3-235B-A22B language models, 4 key/value heads)
    "internvl3.5-30b-a3b": lambda: _internvl_real("300m", 2048, 6144, 48, 32, n_kv_heads=4, d_expert=768),
    "internvl3.5-241b-a28b": lambda: _internvl_real("6b", 4096, 12288, 94, 64, n_kv_heads=4, d_expert=1536),
}


def real_config(name: str) -> PreTrainedConfig:
    """The HF config (no weights) of a full-size checkpoint, with the values of the real
    `config.json` (see ARCHITECTURES.md §1.3 / §2.4). Names: see `real_config_names()`."""
    if name not in _REAL_CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(_REAL_CONFIGS)}")
    return _REAL_CONFIGS[name]()


def real_config_names() -> tuple[str, ...]:
    """The names `real_config` knows."""
    return tuple(_REAL_CONFIGS)
