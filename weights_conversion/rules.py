"""Renaming tables shared by the formats: canonical Hugging Face names -> hooked names.

Each format module first rewrites its on-disk keys into a *canonical* layout
(`language_model.*`, `lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`, with the
transformers-5 runtime sub-names) and then applies these ordered regex tables. A table maps a key
to a hooked name, to `IGNORE` (known and unused), or leaves it unmatched (an error).
"""

from __future__ import annotations

import re
from typing import Callable

from weights_conversion.io import Assignment, Plan

IGNORE = "<ignore>"
Rule = tuple[str, str]  # (regex on the canonical key, replacement or IGNORE)

# Llama and Qwen3 decoder (transformers 5.x names under `language_model.`)
LANGUAGE_MODEL_RULES: list[Rule] = [
    (r"language_model\.embed_tokens\.weight", "embed.weight"),
    (r"language_model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"language_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"blocks.\1.attn.\2_proj.\3"),
    (r"language_model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blocks.\1.attn.\2_norm.weight"),
    (r"language_model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"blocks.\1.mlp.\2_proj.\3"),
    # Qwen3-MoE: the router, and the experts as transformers 5.x holds them (per-expert keys: EXPERT_KEY)
    (r"language_model\.layers\.(\d+)\.mlp\.gate\.weight", r"blocks.\1.mlp.router.weight"),
    (r"language_model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", r"blocks.\1.mlp.\2"),
    (r"language_model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", IGNORE),  # recomputed
    (r"language_model\.rotary_emb\.inv_freq", IGNORE),
    (r"language_model\.norm\.weight", "ln_final.weight"),
    (r"lm_head\.weight", "unembed.weight"),
]

PROJECTOR_RULES: list[Rule] = [
    (r"multi_modal_projector\.linear_([12])\.(weight|bias)", r"projector.linear_\1.\2"),
    (r"multi_modal_projector\.layer_norm\.(weight|bias)", r"projector.ln.\1"),
]

# CLIP vision tower (transformers 5.x `CLIPVisionModel`, no `vision_model.` level)
CLIP_RULES: list[Rule] = [
    (r"vision_tower\.embeddings\.class_embedding", "vision.cls_token"),
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision.patch_embed.weight"),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision.pos_embed"),
    (r"vision_tower\.embeddings\.position_ids", IGNORE),
    (r"vision_tower\.pre_layrnorm\.(weight|bias)", r"vision.ln_pre.\1"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"vision.blocks.\1.attn.\2_proj.\3"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"vision.blocks.\1.attn.o_proj.\2"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"vision.blocks.\1.ln1.\2"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"vision.blocks.\1.ln2.\2"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"vision.blocks.\1.mlp.up_proj.\2"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"vision.blocks.\1.mlp.down_proj.\2"),
    (r"vision_tower\.post_layernorm\.(weight|bias)", IGNORE),  # LLaVA reads pre-norm hidden states
]

# InternViT (transformers 5.x `InternVLVisionModel`)
INTERNVIT_RULES: list[Rule] = [
    (r"vision_tower\.embeddings\.cls_token", "vision.cls_token"),
    (r"vision_tower\.embeddings\.position_embeddings", "vision.pos_embed"),
    (r"vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"vision.patch_embed.\1"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"vision.blocks.\1.attn.\2_proj.\3"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.attention\.([qk])_norm\.weight", r"vision.blocks.\1.attn.\2_norm.weight"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.(weight|bias)", r"vision.blocks.\1.attn.o_proj.\2"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"vision.blocks.\1.ln1.\2"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"vision.blocks.\1.ln2.\2"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"vision.blocks.\1.mlp.up_proj.\2"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"vision.blocks.\1.mlp.down_proj.\2"),
    (r"vision_tower\.encoder\.layer\.(\d+)\.lambda_([12])", r"vision.blocks.\1.lambda_\2"),
]

_VISION_BLOCK = re.compile(r"^vision\.blocks\.(\d+)\.")
# Per-expert tensors (4.x -HF and original checkpoints): stacked into the fused parameters as
# transformers 5.x's `MergeModulelist` + `Concatenate` do (gate rows, then up rows, per expert)
EXPERT_KEY = re.compile(r"language_model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def expert_part(key: str) -> tuple[str, tuple[int, int, int]] | None:
    """(hooked parameter, part) of a canonical per-expert key (see `Assignment.part`), or None."""
    m = EXPERT_KEY.fullmatch(key)
    if m is None:
        return None
    layer, expert, kind = int(m.group(1)), int(m.group(2)), m.group(3)
    if kind == "down":
        return f"blocks.{layer}.mlp.down_proj", (expert, 0, 1)
    return f"blocks.{layer}.mlp.gate_up_proj", (expert, 0 if kind == "gate" else 1, 2)


def apply_rules(key: str, rules: list[Rule]) -> str | None:
    """The hooked name of a canonical key, `IGNORE`, or None when no rule matches."""
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return IGNORE if replacement == IGNORE else re.sub(pattern, replacement, key)
    return None


def build_plan(
    keys: list[str],
    canonical: Callable[[str], str],
    rules: list[Rule],
    vision_blocks_used: int,
    reader: str = "main",
) -> Plan:
    """Map every checkpoint key; blocks of the vision tower deeper than the features LLaVA or
    InternVL read are known and ignored (the hooked tower does not build them)."""
    plan = Plan()
    for key in keys:
        if part := expert_part(canonical(key)):
            plan.assignments.append(Assignment(part[0], key, reader=reader, part=part[1]))
            continue
        target = apply_rules(canonical(key), rules)
        if target is None:
            plan.unknown.append(key)
        elif target == IGNORE:
            plan.ignored.append(key)
        elif (m := _VISION_BLOCK.match(target)) and int(m.group(1)) >= vision_blocks_used:
            plan.ignored.append(key)
        else:
            plan.assignments.append(Assignment(target, key, reader=reader))
    return plan


def merge_plans(*plans: Plan) -> Plan:
    out = Plan()
    for plan in plans:
        out.assignments += plan.assignments
        out.ignored += plan.ignored
        out.unknown += plan.unknown
    return out
