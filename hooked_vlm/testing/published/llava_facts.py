"""The published LLaVA-1.5 repositories as facts: their config files, field for field.

Where each came from (see the README's "Published checkpoints" table): llava-hf/llava-1.5-7b-hf and
liuhaotian/llava-v1.5-7b are byte copies of the hub files found in public GitHub snapshots; the 13B
configs differ from the 7B ones only in the text model's sizes (and `_name_or_path`), which two
independent transcriptions of liuhaotian/llava-v1.5-13b's config confirm; llava-1.5-13b-hf's
other files and openai/clip-vit-large-patch14-336's config.json were not found and are assumed to be
what the same tools wrote for the 7B repository (the CLIP config in transformers 4.2x's full dump
with the legacy `*_config_dict` fields). Written as Python data, not copies of the files.
"""

from __future__ import annotations

import copy

from hooked_vlm.testing.tokenizers import LLAVA_CHAT_TEMPLATE

CLIP_REPO = "openai/clip-vit-large-patch14-336"
_TOKEN = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)


# ------------------------------------------------------------------------------------- llava-hf
def llava_hf_config(size: str) -> dict:
    """config.json of llava-hf/llava-1.5-{7b,13b}-hf. The 7B file leaves the Llama sizes at their
    defaults (4096 wide, 32 layers); the 13B file states them."""
    text = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    }
    if size == "13b":
        text = {"_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"], "hidden_size": 5120,
                "intermediate_size": 13824, "max_position_embeddings": 4096, "model_type": "llama",
                "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
                "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064}  # fmt: skip
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
        },  # fmt: skip
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


LLAVA_HF_GENERATION_CONFIG = {
    "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
    "transformers_version": "4.36.0.dev0",
}  # fmt: skip
LLAVA_HF_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA_HF_PROCESSOR_CONFIG = {
    "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14, "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}  # fmt: skip
LLAVA_HF_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "add_prefix_space": None,
    "added_tokens_decoder": {
        str(i): {"content": token, **_TOKEN, "special": True}
        for i, token in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>"), (32001, "<pad>"))
    },
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "extra_special_tokens": {"image_token": "<image>"},
    "image_token": "<image>",
    "legacy": False,
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": "<pad>",
    "padding_side": "left",
    "processor_class": "LlavaProcessor",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "trust_remote_code": False,
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
LLAVA_HF_SPECIAL_TOKENS_MAP = {
    name: {"content": token, **_TOKEN}
    for name, token in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "<unk>"))
}
LLAVA_HF_ADDED_TOKENS = {"<image>": 32000, "<pad>": 32001}
LLAVA_HF_TEMPLATE = LLAVA_CHAT_TEMPLATE  # chat_template.jinja, and chat_template.json's "chat_template"


# ------------------------------------------------------------------------------------- original
def llava_original_config(size: str) -> dict:
    """config.json of liuhaotian/llava-v1.5-{7b,13b} (LlavaLlamaForCausalLM, transformers 4.31)."""
    wide = size == "13b"
    return {
        "_name_or_path": f"llava-v1.5-{size}",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "hidden_act": "silu",
        "hidden_size": 5120 if wide else 4096,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": 13824 if wide else 11008,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": CLIP_REPO,
        "model_type": "llava",
        "num_attention_heads": 40 if wide else 32,
        "num_hidden_layers": 40 if wide else 32,
        "num_key_value_heads": 40 if wide else 32,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": 32000,
    }


LLAVA_ORIGINAL_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0, "transformers_version": "4.31.0"}
LLAVA_ORIGINAL_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", **_TOKEN},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", **_TOKEN},
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", **_TOKEN},
}
LLAVA_ORIGINAL_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", **_TOKEN},
    "eos_token": {"content": "</s>", **_TOKEN},
    "pad_token": "<unk>",
    "unk_token": {"content": "<unk>", **_TOKEN},
}


# ------------------------------------------------------------------------------------- CLIP tower
# transformers 4.2x dumped every PretrainedConfig attribute into a sub-config; openai's CLIP
# repositories still carry such dumps next to the short legacy `text_config_dict`/`vision_config_dict`.
_DUMP = {
    "add_cross_attention": False, "architectures": None, "attention_dropout": 0.0, "bad_words_ids": None,
    "bos_token_id": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "eos_token_id": None,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "hidden_act": "quick_gelu", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-05, "length_penalty": 1.0, "max_length": 20,
    "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "typical_p": 1.0, "use_bfloat16": False,
}  # fmt: skip
_CLIP_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}
_CLIP_VISION = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}  # fmt: skip


def clip_config() -> dict:
    """config.json of openai/clip-vit-large-patch14-336 (a full `CLIPModel`: text tower too)."""
    text = copy.deepcopy(_DUMP) | {"_name_or_path": "", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                   "max_position_embeddings": 77, "model_type": "clip_text_model", "vocab_size": 49408} | _CLIP_TEXT  # fmt: skip
    vision = copy.deepcopy(_DUMP) | {"_name_or_path": "", "model_type": "clip_vision_model", "num_channels": 3} | _CLIP_VISION
    return {
        "_name_or_path": CLIP_REPO,
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": text,
        "text_config_dict": dict(_CLIP_TEXT),
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": vision,
        "vision_config_dict": dict(_CLIP_VISION),
    }


# The CLIPFeatureExtractor era: `size` and `crop_size` are plain integers
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}
