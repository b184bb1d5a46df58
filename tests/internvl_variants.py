"""The InternVL configurations the InternVL tests run on: the two of `conftest.INTERNVL_VARIANTS`
and the two of `conftest.MOE_VARIANTS` (Qwen3-MoE language models), plus one built here whose
geometry differs from all of them so that nothing may hard-code 56-px tiles, 2x2 tokens per view,
28-px tokens or the last vision layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hooked_vlm.testing import build_tiny_internvl

# InternViT-300M style, GQA ratio 2, separate lm_head, 4.x legacy keys; 72-px tiles of 12-px
# patches (6x6 patches -> 3x3 tokens of 24 px per view); three vision blocks of which the
# projector reads the output of the second (vision_feature_layer -2), so the third is unused.
GQA_VARIANT = dict(
    seed=5, vision_variant="300m", n_heads=4, n_key_value_heads=2, tie_word_embeddings=False, vision_layers=3,
    image_size=72, patch_size=12, max_patches=6, key_layout="legacy",
)  # fmt: skip
# and the two mixture-of-experts checkpoints of `conftest.MOE_VARIANTS` (top-2 renormalised; top-1 raw)
VARIANTS = ("internvl_300m", "internvl_6b", "internvl_gqa", "internvl_moe", "internvl_moe_top1")


def build_internvl_gqa(path: Path) -> Path:
    build_tiny_internvl(path, **GQA_VARIANT)
    config = json.loads((path / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def variant_directory(name: str, tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if name == "internvl_gqa":
        return build_internvl_gqa(tmp_path_factory.mktemp("internvl_gqa"))
    return tiny_checkpoint(name)
