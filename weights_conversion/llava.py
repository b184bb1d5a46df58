"""LLaVA-1.5 checkpoints: the llava-hf format and the original liuhaotian format.

llava-hf (`LlavaForConditionalGeneration`) on-disk keys, depending on who saved them
(ARCHITECTURES §1.6, §3):
    legacy (4.36+ hub files):  language_model.model.X, language_model.lm_head.weight,
                               vision_tower.vision_model.X, multi_modal_projector.X
    runtime (5.x in memory):   model.language_model.X, lm_head.weight, model.vision_tower.X,
                               model.multi_modal_projector.X
original (`LlavaLlamaForCausalLM`, ARCHITECTURES §1.7): model.X (Llama), lm_head.weight,
    model.mm_projector.{0,2}.*; the CLIP tower is a separate checkpoint named by
    `mm_vision_tower` (keys vision_model.*), unless a full state dict was saved
    (model.vision_tower.vision_tower.vision_model.*).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from hooked_vlm.families import llava as family
from weights_conversion.hub import HubOptions, resolve_directory
from weights_conversion.io import CheckpointReader, Plan, image_processor_config, load_tokenizer
from weights_conversion.rules import CLIP_RULES, IGNORE, LANGUAGE_MODEL_RULES, PROJECTOR_RULES, build_plan, merge_plans

RULES = LANGUAGE_MODEL_RULES + PROJECTOR_RULES + CLIP_RULES
CLIP_CHECKPOINT_RULES = CLIP_RULES + [(r"clip_unused\..*", IGNORE)]
ORIGINAL_IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: the original vocabulary has no image token


def is_llava_hf(config: dict) -> bool:
    return config.get("model_type") == "llava" and "mm_vision_tower" not in config


def is_llava_original(config: dict) -> bool:
    return "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in (config.get("architectures") or [])


# ---------------------------------------------------------------------------------- key layouts
def canonical_hf_key(key: str) -> str:
    """Any llava-hf layout (legacy or runtime) -> the canonical layout of `rules.py`."""
    key = re.sub(r"^model\.", "", key)
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    key = re.sub(r"^language_model\.(model\.)?", "language_model.", key)
    return re.sub(r"^vision_tower\.(vision_model\.)?", "vision_tower.", key)


def canonical_original_key(key: str) -> str:
    """Original LLaVA keys -> canonical. (Same substitutions as transformers'
    `convert_llava_weights_to_hf.py`, followed by the 5.x renames.)"""
    if key.startswith("model.vision_tower.vision_tower."):
        return canonical_clip_key(key[len("model.vision_tower.vision_tower.") :])
    if m := re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key):
        return f"multi_modal_projector.linear_{int(m.group(1)) // 2 + 1}.{m.group(2)}"
    if key == "lm_head.weight":
        return key
    return re.sub(r"^model\.", "language_model.", key)


def canonical_clip_key(key: str) -> str:
    """A CLIP checkpoint (`CLIPVisionModel` or a full `CLIPModel`): the vision half is the tower."""
    if key.startswith("vision_model."):
        return "vision_tower." + key[len("vision_model.") :]
    return "clip_unused." + key  # text tower, projections, logit scale


# ---------------------------------------------------------------------------------- configs
def config_from_llava_hf(hf_config: Any, keys: list[str], dtype: torch.dtype):
    """Hooked config of a `LlavaConfig`; `keys` decides whether the LM head is tied (only when
    the checkpoint has no separate head)."""
    has_head = any(canonical_hf_key(k) == "lm_head.weight" for k in keys)
    text = hf_config.text_config
    return family.hooked_config(
        text,
        hf_config.vision_config,
        image_token_id=hf_config.image_token_id,
        vision_feature_layer=hf_config.vision_feature_layer,
        feature_select_strategy=hf_config.vision_feature_select_strategy,
        projector_act_fn=hf_config.projector_hidden_act,
        projector_bias=getattr(hf_config, "multimodal_projector_bias", True),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)) and not has_head,
        checkpoint_format="llava-hf",
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(hf_config, "pad_token_id", None) or getattr(text, "pad_token_id", None),
        dtype=dtype,
    )


def original_text_config(raw: dict):
    """The Llama half of an original LLaVA `config.json`."""
    from transformers import LlamaConfig

    skip = {"model_type", "architectures", "auto_map", "transformers_version"}
    if raw.get("rope_scaling", 0) is None:  # 4.31-era configs spell "no scaling" so; 5.x warns about the key
        skip.add("rope_scaling")
    return LlamaConfig.from_dict({k: v for k, v in raw.items() if k not in skip and not k.startswith("mm_")})


def config_from_llava_original(raw: dict, clip_config: Any, keys: list[str], dtype: torch.dtype):
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise NotImplementedError(f"mm_projector_type {raw.get('mm_projector_type')!r} is not supported (mlp2x_gelu)")
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise NotImplementedError("mm_use_im_start_end / mm_use_im_patch_token are not supported (LLaVA-1.5 uses neither)")
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"unknown mm_vision_select_feature {select!r}")
    text = original_text_config(raw)
    vision = getattr(clip_config, "vision_config", clip_config)
    return family.hooked_config(
        text,
        vision,
        image_token_id=ORIGINAL_IMAGE_TOKEN_ID,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        feature_select_strategy="default" if select == "patch" else "full",
        projector_act_fn="gelu",
        projector_bias=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)) and "lm_head.weight" not in keys,
        checkpoint_format="llava-original",
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------- plans
def plan_llava_hf(keys: list[str], vision_blocks_used: int) -> Plan:
    return build_plan(keys, canonical_hf_key, RULES, vision_blocks_used)


def plan_llava_original(keys: list[str], clip_keys: list[str] | None, vision_blocks_used: int) -> Plan:
    plan = build_plan(keys, canonical_original_key, RULES, vision_blocks_used)
    if clip_keys is None:
        return plan
    return merge_plans(plan, build_plan(clip_keys, canonical_clip_key, CLIP_CHECKPOINT_RULES, vision_blocks_used, "clip"))


# ---------------------------------------------------------------------------------- loading
def load(directory: Path, raw_config: dict, dtype: torch.dtype, placement: Any, hub: HubOptions = HubOptions()):
    """Build a hooked LLaVA from a llava-hf or original checkpoint directory. `hub`: how to find
    an original checkpoint's CLIP tower (`mm_vision_tower`, a path or a hub id)."""
    from transformers import AutoConfig

    from weights_conversion import assemble

    reader = CheckpointReader.from_directory(directory)
    processor_config = image_processor_config(directory)
    if is_llava_hf(raw_config):
        cfg = config_from_llava_hf(AutoConfig.from_pretrained(directory), reader.keys(), dtype)
        readers, plan = {"main": reader}, plan_llava_hf(reader.keys(), cfg.vision.n_layers)
        # llava-hf repos centre-crop; a LlavaImageProcessor with do_pad=True pads like the original
        image_mode, template = ("pad" if (processor_config or {}).get("do_pad") else "crop"), "hf"
    else:
        clip_dir = resolve_directory(raw_config["mm_vision_tower"], hub.for_another_repository())
        clip_config = AutoConfig.from_pretrained(clip_dir)
        tower_inside = any(k.startswith("model.vision_tower.") for k in reader.keys())
        clip_reader = None if tower_inside else CheckpointReader.from_directory(clip_dir)
        cfg = config_from_llava_original(raw_config, clip_config, reader.keys(), dtype)
        readers = {"main": reader, "clip": clip_reader}
        plan = plan_llava_original(reader.keys(), None if tower_inside else clip_reader.keys(), cfg.vision.n_layers)
        processor_config = processor_config or image_processor_config(clip_dir)
        image_mode = "pad" if raw_config.get("image_aspect_ratio", "pad") == "pad" else "crop"
        template = "vicuna_v1"
    preprocessing = family.LlavaPreprocessing.from_processor_config(
        processor_config, cfg.vision.image_size, cfg.vision.patch_size, image_mode=image_mode, template=template
    )
    tokenizer = load_tokenizer(directory) if template == "vicuna_v1" else None  # llava-hf: AutoTokenizer as transformers does
    return assemble(cfg, plan, readers, directory, preprocessing, dtype, placement, tokenizer=tokenizer)
