"""InternVL-3.5 checkpoints: the -HF format and the original remote-code format.

-HF (`InternVLForConditionalGeneration`, model_type "internvl") on-disk keys, depending on who
saved them (ARCHITECTURES §2.6, §3):
    legacy (the hub's -HF repos):  language_model.model.X, language_model.lm_head.weight,
                                   vision_tower.X, multi_modal_projector.X
    runtime (5.x in memory):       model.language_model.X, lm_head.weight, model.vision_tower.X,
                                   model.multi_modal_projector.X
original (`InternVLChatModel`, model_type "internvl_chat", ARCHITECTURES §2.7):
    vision_model.embeddings.{class_embedding, patch_embedding, position_embedding},
    vision_model.encoder.layers.{i}.{attn.qkv, attn.q_norm, attn.k_norm, attn.proj, mlp.fc1/2,
    norm1, norm2, ls1, ls2}, mlp1.{0,1,3} (LayerNorm, Linear, Linear), language_model.model.X,
    language_model.lm_head.weight. The fused `attn.qkv` is split by rows into q | k | v.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from hooked_vlm.families import internvl as family
from weights_conversion.io import Assignment, CheckpointReader, ConversionError, Plan, image_processor_config, load_tokenizer
from weights_conversion.rules import (
    IGNORE,
    INTERNVIT_RULES,
    LANGUAGE_MODEL_RULES,
    PROJECTOR_RULES,
    build_plan,
    merge_plans,
)

RULES = (
    LANGUAGE_MODEL_RULES
    + PROJECTOR_RULES
    + INTERNVIT_RULES
    + [(r"vision_tower\.embeddings\.mask_token", IGNORE)]  # masked-image-modelling only
)
# The original vision config's defaults (`InternVisionConfig`, an InternViT-6B), used for any
# field its config.json leaves out; HF's `InternVLVisionConfig` defaults differ (300M-like).
ORIGINAL_VISION_DEFAULTS = dict(
    num_channels=3,
    patch_size=14,
    image_size=224,
    qkv_bias=False,
    hidden_size=3200,
    num_attention_heads=25,
    intermediate_size=12800,
    qk_normalization=True,
    num_hidden_layers=48,
    hidden_act="gelu",
    norm_type="rms_norm",
    layer_norm_eps=1e-6,
)
_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")


def is_internvl_hf(config: dict) -> bool:
    return config.get("model_type") == "internvl"


def is_internvl_original(config: dict) -> bool:
    return config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or [])


# ---------------------------------------------------------------------------------- key layouts
def canonical_hf_key(key: str) -> str:
    """Any -HF layout (legacy or runtime) -> the canonical layout of `rules.py`."""
    key = re.sub(r"^model\.", "", key)
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    return re.sub(r"^language_model\.(model\.)?", "language_model.", key)


# The renames of transformers' `convert_internvl_weights_to_hf.py`, in its order
_ORIGINAL_VISION_RENAMES = (
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
)
_ORIGINAL_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}  # mlp1.2 is the GELU


def canonical_original_key(key: str) -> str:
    """Original `InternVLChatModel` keys -> canonical (the fused qkv is handled separately)."""
    if key.startswith("vision_model."):
        for pattern, replacement in _ORIGINAL_VISION_RENAMES:
            key = re.sub(pattern, replacement, key)
        return key
    if m := re.fullmatch(r"mlp1\.(\d)\.(weight|bias)", key):
        return f"multi_modal_projector.{_ORIGINAL_PROJECTOR.get(m.group(1), 'unknown_' + m.group(1))}.{m.group(2)}"
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    return re.sub(r"^language_model\.model\.", "language_model.", key)


# ---------------------------------------------------------------------------------- configs
def _has_lm_head(keys: list[str], canonical) -> bool:
    return any(canonical(k) == "lm_head.weight" for k in keys)


def config_from_internvl_hf(hf_config: Any, keys: list[str], dtype: torch.dtype):
    """Hooked config of an `InternVLConfig`. The LM head is tied only when the checkpoint has
    none: InternVL-3.5 ships a separate head although `InternVLConfig` defaults to tying (pitfall 15)."""
    text = hf_config.text_config
    tie = bool(getattr(hf_config, "tie_word_embeddings", False)) and not _has_lm_head(keys, canonical_hf_key)
    return family.hooked_config(
        text,
        hf_config.vision_config,
        image_token_id=hf_config.image_token_id,
        vision_feature_layer=hf_config.vision_feature_layer,
        feature_select_strategy=hf_config.vision_feature_select_strategy,
        downsample_ratio=hf_config.downsample_ratio,
        projector_act_fn=hf_config.projector_hidden_act,
        tie_word_embeddings=tie,
        checkpoint_format="internvl-hf",
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(hf_config, "pad_token_id", None) or getattr(text, "pad_token_id", None),
        # HF hard-codes 1e-6 for InternViT-6B's q/k RMSNorm (pitfall 2)
        vision_qk_norm_eps=1e-6,
        dtype=dtype,
    )


def original_vision_config(raw: dict):
    """The original `vision_config` as an HF `InternVLVisionConfig` (the conversion script's renames:
    `qkv_bias -> attention_bias`, `qk_normalization -> use_qk_norm`)."""
    from transformers import InternVLVisionConfig

    v = ORIGINAL_VISION_DEFAULTS | (raw.get("vision_config") or {})
    image_size = raw.get("force_image_size") or v["image_size"]
    return InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        attention_bias=v["qkv_bias"],
        use_qk_norm=v["qk_normalization"],
        norm_type=v["norm_type"],
        layer_norm_eps=v["layer_norm_eps"],
        hidden_act=v["hidden_act"],
        image_size=image_size,
        patch_size=v["patch_size"],
        num_channels=v["num_channels"],
    )


def original_text_config(raw: dict):
    """The `llm_config` of an original config as a transformers 5.x config (legacy `rope_theta`
    is folded into `rope_parameters` by the config class)."""
    from transformers import AutoConfig

    llm = dict(raw.get("llm_config") or {})
    if "model_type" not in llm:
        raise ConversionError("the original InternVL config has no llm_config.model_type")
    skip = {"architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    if llm.get("rope_scaling", 0) is None:  # 4.x configs spell "no scaling" so; 5.x warns about the key
        skip.add("rope_scaling")
    return AutoConfig.for_model(llm.pop("model_type"), **{k: v for k, v in llm.items() if k not in skip})


def config_from_internvl_original(raw: dict, keys: list[str], tokenizer: Any, dtype: torch.dtype):
    """Hooked config of an original `internvl_chat` config.json. The image token id is the
    tokenizer's `<IMG_CONTEXT>` (the original code looks it up the same way)."""
    if raw.get("ps_version", "v1") != "v2":  # InternVLChatConfig defaults to v1
        raise NotImplementedError(
            f"ps_version {raw.get('ps_version', 'v1 (the default)')!r} is not supported: only 'v2' pixel shuffle, "
            "which Hugging Face implements; v1 transposes the image (pitfall 9)"
        )
    if raw.get("pad2square"):
        raise NotImplementedError("pad2square=True is not supported (InternVL-3.5 does not pad)")
    text = original_text_config(raw)
    vision = original_vision_config(raw)
    image_token_id = tokenizer.convert_tokens_to_ids(family.IMAGE_PLACEHOLDER)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConversionError(f"the tokenizer has no {family.IMAGE_PLACEHOLDER!r} token")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")  # the template's separator stops chat()
    layer_norm_eps = vision.layer_norm_eps
    return family.hooked_config(
        text,
        vision,
        image_token_id=image_token_id,
        vision_feature_layer=raw.get("select_layer", -1),
        feature_select_strategy="default",
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        projector_act_fn="gelu",
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False))
        and not _has_lm_head(keys, canonical_original_key),
        checkpoint_format="internvl-original",
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=end_of_turn if end_of_turn is not None else getattr(text, "eos_token_id", None),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(text, "pad_token_id", None),
        vision_qk_norm_eps=layer_norm_eps,  # the original q/k norms use the tower's eps
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------- plans
def plan_internvl_hf(keys: list[str], vision_blocks_used: int) -> Plan:
    return build_plan(keys, canonical_hf_key, RULES, vision_blocks_used)


def plan_internvl_original(reader: CheckpointReader, vision_blocks_used: int) -> Plan:
    """The renaming plan, with each fused `attn.qkv` split by rows into q | k | v."""
    fused = [k for k in reader.keys() if _QKV.fullmatch(k)]
    plan = build_plan([k for k in reader.keys() if k not in fused], canonical_original_key, RULES, vision_blocks_used)
    split = Plan()
    for key in fused:
        layer, kind = _QKV.fullmatch(key).groups()
        if int(layer) >= vision_blocks_used:
            split.ignored.append(key)
            continue
        rows = reader.shape(key)[0]
        if rows % 3:
            raise ConversionError(f"{key} has {rows} rows, not a multiple of 3 (q | k | v)")
        d = rows // 3
        for i, name in enumerate("qkv"):  # consecutive, so load_plan reads the fused tensor once
            target = f"vision.blocks.{layer}.attn.{name}_proj.{kind}"
            split.assignments.append(Assignment(target, key, rows=(i * d, (i + 1) * d)))
    return merge_plans(plan, split)


# ---------------------------------------------------------------------------------- loading
def original_preprocessing(raw: dict, tile_size: int, patch_size: int) -> family.InternVLPreprocessing:
    """Tiling settings of an original config: `min/max_dynamic_patch`, `use_thumbnail`,
    `dynamic_image_size` (off: one tile), ImageNet mean/std as in InternVL's `build_transform`."""
    dynamic = raw.get("dynamic_image_size", False)
    return family.InternVLPreprocessing(
        tile_size=tile_size,
        patch_size=patch_size,
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        min_tiles=int(raw.get("min_dynamic_patch", 1)) if dynamic else 1,
        max_tiles=int(raw.get("max_dynamic_patch", 6)) if dynamic else 1,
        use_thumbnail=bool(raw.get("use_thumbnail", False)),
        template=original_template(raw),
    )


def original_template(raw: dict) -> family.Template:
    """The conversation template `model.chat()` uses (`template` in config.json): "internvl2_5",
    with its system message, for every InternVL-3.5 (and 2.5/3) checkpoint. Another one is not
    implemented: prompts then follow the -HF chat template, and a warning says so."""
    name = raw.get("template")
    if name == "internvl2_5":
        return "internvl2_5"
    warnings.warn(
        f"conversation template {name!r} of this original InternVL checkpoint is not implemented; prepare() uses the "
        "InternVL-HF chat template (no system message) unless given template=...",
        stacklevel=5,
    )
    return "hf"


def refuse_unsupported_variants(raw_config: dict) -> None:
    """InternVL3_5-GPT-OSS-20B-A4B-Preview(-HF) pairs InternViT with gpt-oss-20b (attention sinks,
    alternating sliding-window attention, YaRN RoPE, 32 experts with a clamped SwiGLU): say so by
    name, before any file is read, rather than fail on one of its fields."""
    text = raw_config.get("text_config") or raw_config.get("llm_config") or {}
    if text.get("model_type") == "gpt_oss" or raw_config.get("template") == "internvl3_5_gpt_oss":
        raise NotImplementedError(
            "this is an InternVL3.5-GPT-OSS checkpoint (InternVL3_5-GPT-OSS-20B-A4B-Preview: a gpt_oss language model with "
            "attention sinks, sliding-window attention and mixture-of-experts MLPs), which hooked_vlm does not support "
            "(the README's table lists the supported checkpoints)"
        )


def load(directory: Path, raw_config: dict, dtype: torch.dtype, placement: Any, hub: Any = None):
    """Build a hooked InternVL from an -HF or original checkpoint directory (`hub` is unused: an
    InternVL repository holds everything it needs)."""
    from transformers import AutoConfig

    from weights_conversion import assemble

    refuse_unsupported_variants(raw_config)
    reader = CheckpointReader.from_directory(directory)
    tokenizer = load_tokenizer(directory)
    if is_internvl_hf(raw_config):
        cfg = config_from_internvl_hf(AutoConfig.from_pretrained(directory), reader.keys(), dtype)
        plan = plan_internvl_hf(reader.keys(), cfg.vision.n_layers)
        preprocessing = family.InternVLPreprocessing.from_processor_config(
            image_processor_config(directory), cfg.vision.image_size, cfg.vision.patch_size, cfg.downsample_ratio
        )
    elif is_internvl_original(raw_config):
        cfg = config_from_internvl_original(raw_config, reader.keys(), tokenizer, dtype)
        plan = plan_internvl_original(reader, cfg.vision.n_layers)
        preprocessing = original_preprocessing(raw_config, cfg.vision.image_size, cfg.vision.patch_size)
    else:
        raise ValueError(f"{directory} is not an InternVL checkpoint (model_type {raw_config.get('model_type')!r})")
    return assemble(cfg, plan, {"main": reader}, directory, preprocessing, dtype, placement, tokenizer=tokenizer)
