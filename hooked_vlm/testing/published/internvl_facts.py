"""The published dense InternVL-3.5 repositories as facts: their config files, field for field.

Found (public GitHub copies of the hub files): OpenGVLab/InternVL3_5-8B's config.json and
chat_template.jinja, InternVL3_5-8B-HF's config.json and generation_config.json, and both weight
indices' key lists. Every other size is assumed to be the 8B file with its own sizes (the Qwen3
base model's widths, depths and heads, the tower of ARCHITECTURES §2.4: InternViT-6B for 38B):
the same training pipeline wrote them all. Tokenizer, preprocessor and processor files of the
3.5 repositories were not found; they are assumed to be what InternVL3's repositories ship (the
original repositories' CLIPFeatureExtractor-style preprocessor_config with integer sizes, the -HF
ones' GotOcr2 config as transformers 4.5x saved it) with Qwen3's vocabulary and InternVL-3.5's
token ids (`<IMG_CONTEXT>` = 151671, which the -HF config states).
"""

from __future__ import annotations

from hooked_vlm.testing.internvl import INTERNVL_CHAT_AUTO_MAP
from hooked_vlm.testing.tokenizers import INTERNVL_CHAT_TEMPLATE

# size -> Qwen3 base model and its shape; the vision tower
SIZES: dict[str, dict] = {
    "1B": dict(base="Qwen3-0.6B", hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072, tower="300M"),
    "2B": dict(base="Qwen3-1.7B", hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, tower="300M"),
    "4B": dict(base="Qwen3-4B", hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728, tower="300M"),
    "8B": dict(base="Qwen3-8B", hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, tower="300M"),
    "14B": dict(base="Qwen3-14B", hidden=5120, layers=40, heads=40, kv_heads=8, intermediate=17408, tower="300M"),
    "38B": dict(base="Qwen3-32B", hidden=5120, layers=64, heads=64, kv_heads=8, intermediate=25600, tower="6B"),
}
TOWERS: dict[str, dict] = {
    # InternViT-300M-448px-V2.5 (LayerNorm, qkv bias) and InternViT-6B-448px-V2.5 (RMSNorm, q/k norm)
    "300M": dict(hidden=1024, layers=24, heads=16, intermediate=4096, norm="layer_norm", qkv_bias=True, qk_norm=False),
    "6B": dict(hidden=3200, layers=45, heads=25, intermediate=12800, norm="rms_norm", qkv_bias=False, qk_norm=True),
}

# Qwen3's added tokens (ids 151643-151668), then InternVL's (151669-151677): 35 tokens, which
# makes the -HF added_tokens.json exactly its published 892 bytes
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)  # fmt: skip
INTERNVL_ADDED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
FIRST_ADDED_ID = 151643
QWEN3_NOT_SPECIAL = frozenset(QWEN3_ADDED_TOKENS[14:])  # tool/fim/think markers are plain added tokens in Qwen3
IMAGE_TOKEN_ID = 151671  # <IMG_CONTEXT>

ORIGINAL_TEMPLATE = INTERNVL_CHAT_TEMPLATE.replace("<IMG_CONTEXT>", "<image>")  # 475 bytes, as published
HF_TEMPLATE = INTERNVL_CHAT_TEMPLATE  # 481 bytes (the conversion script's, as InternVL3-*-hf ship)


def _llm_config(size: str) -> dict:
    s = SIZES[size]
    return {
        "_name_or_path": f"/root/codespace/checkpoints/{s['base']}",
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "debug": False,
        "eos_token_id": 151645,
        "ep_size": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": 40960,
        "max_window_layers": s["layers"],
        "micro_forward": False,
        "model_type": "qwen3",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "skip_checkpoint": False,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "use_deepep": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }


def internvl_original_config(size: str) -> dict:
    """config.json of OpenGVLab/InternVL3_5-{size} (remote-code InternVLChatModel)."""
    t = TOWERS[SIZES[size]["tower"]]
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": dict(INTERNVL_CHAT_AUTO_MAP),
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "eos_token_id": 151645,
        "force_image_size": 448,
        "llm_config": _llm_config(size),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "pad_token_id": 151643,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": None,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_dropout": 0.0,
            "auto_map": {
                "AutoConfig": "configuration_intern_vit.InternVisionConfig",
                "AutoModel": "modeling_intern_vit.InternVisionModel",
            },
            "drop_path_rate": 0.1,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": t["hidden"],
            "image_size": 448,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": t["intermediate"],
            "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b",
            "norm_type": t["norm"],
            "num_attention_heads": t["heads"],
            "num_channels": 3,
            "num_hidden_layers": t["layers"],
            "patch_size": 14,
            "qk_normalization": t["qk_norm"],
            "qkv_bias": t["qkv_bias"],
            "torch_dtype": "bfloat16",
            "use_fa3": False,
            "use_flash_attn": True,
        },
    }


def internvl_hf_config(size: str) -> dict:
    """config.json of OpenGVLab/InternVL3_5-{size}-HF (InternVLForConditionalGeneration, written by
    transformers 4.55: no top-level `tie_word_embeddings`, so 5.x's InternVLConfig defaults it to True)."""
    t = TOWERS[SIZES[size]["tower"]]
    text = _llm_config(size) | {"use_cache": True}
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": IMAGE_TOKEN_ID,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": dict(sorted(text.items())),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.55.0",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_bias": t["qkv_bias"],
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": t["hidden"],
            "image_size": [448, 448],
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": t["intermediate"],
            "layer_norm_eps": 1e-06,
            "layer_scale_init_value": 0.1,
            "model_type": "internvl_vision",
            "norm_type": t["norm"],
            "num_attention_heads": t["heads"],
            "num_channels": 3,
            "num_hidden_layers": t["layers"],
            "patch_size": [14, 14],
            "projection_dropout": 0.0,
            "torch_dtype": "bfloat16",
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "use_qk_norm": t["qk_norm"],
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }


HF_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 151643, "eos_token_id": 151645, "transformers_version": "4.55.0"}
HF_PROCESSOR_CONFIG = {"image_seq_length": 256, "processor_class": "InternVLProcessor"}
HF_PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "crop_to_patches": False,  # InternVLProcessor forces it on at call time
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "do_center_crop": None,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "input_data_format": None,
    "max_patches": 12,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "return_tensors": None,
    "size": {"height": 448, "width": 448},
}
# The original repositories' file (unused by their remote code, which tiles by config.json)
ORIGINAL_PREPROCESSOR_CONFIG = {
    "crop_size": 448,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 448,
}
HF_NAMED_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>", "end_image_token": "</img>", "start_image_token": "<img>", "video_token": "<video>",
}  # fmt: skip


def added_tokens() -> dict[str, int]:
    """added_tokens.json: every token past Qwen3's byte-level vocabulary, with its id."""
    return {token: FIRST_ADDED_ID + i for i, token in enumerate(QWEN3_ADDED_TOKENS + INTERNVL_ADDED_TOKENS)}


def tokenizer_config(hf: bool) -> dict:
    """tokenizer_config.json: Qwen3's (no BOS, EOS <|im_end|>, pad <|endoftext|>) with InternVL's
    tokens; the -HF one also names the image tokens InternVLProcessor reads."""
    decoder = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": token not in QWEN3_NOT_SPECIAL}
        for token, i in added_tokens().items()
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN3_ADDED_TOKENS[1:14]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 40960,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if hf:
        config |= dict(HF_NAMED_TOKENS) | {"extra_special_tokens": dict(HF_NAMED_TOKENS), "processor_class": "InternVLProcessor"}
    return dict(sorted(config.items()))


SPECIAL_TOKENS_MAP = {
    "additional_special_tokens": list(QWEN3_ADDED_TOKENS[1:14]),
    "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
}
