"""Shared fixtures: the test photos and tiny random checkpoints built offline once per session.

Checkpoint fixtures (all session-scoped; each directory is built on first use):

- `tiny_checkpoint(name) -> Path`: any checkpoint of `TINY_CHECKPOINTS` by name.
- `llava_dir`, `internvl_dir`: parametrised over every LLaVA / InternVL variant.
- `llava_original_dir`, `internvl_original_dir`: original-format exports of `llava_base` and
  `internvl_6b` (the LLaVA one's CLIP tower sits next to it, named in its `mm_vision_tower`).
- Mixture-of-experts checkpoints (`MOE_VARIANTS`, and `internvl_moe_original`) by name only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from hooked_vlm.testing import (
    build_tiny_internvl,
    build_tiny_llava,
    export_internvl_original,
    export_llava_original,
)

ASSETS = Path(__file__).parent / "assets"

# The test models are tiny: thread start-up and synchronisation cost more than they save, and on
# a shared 2-core machine two spinning OpenMP pools slow a millisecond forward to a second.
torch.set_num_threads(1)

# Variants differ in widths, heads, image sizes, feature layers and key layouts, so that code
# which hard-codes one of them fails on another.
LLAVA_VARIANTS: dict[str, dict] = {
    # 42 px -> 9 image tokens; layer -2 of 3; llava-hf's 4.x key layout.
    "llava_base": dict(seed=0, key_layout="legacy"),
    # 56 px -> 16 tokens; 3 heads of 16; two feature layers concatenated; 5.x runtime names.
    "llava_multilayer": dict(
        seed=1, d_model=48, d_mlp=96, n_layers=3, n_heads=3, vision_d_model=48, vision_d_mlp=96,
        vision_layers=4, vision_heads=4, image_size=56, vision_feature_layer=[-3, -1], key_layout="runtime",
    ),  # fmt: skip
    # 28 px -> 4 patches + CLS ("full"); a positive feature layer (hidden_states[1] = first block's
    # output); transformers 5.23's own save layout.
    "llava_full": dict(
        seed=2, d_model=32, d_mlp=64, n_heads=2, vision_layers=2, image_size=28,
        vision_feature_layer=1, vision_feature_select_strategy="full", key_layout="saved",
    ),  # fmt: skip
}
INTERNVL_VARIANTS: dict[str, dict] = {
    # InternViT-300M style, MHA (GQA ratio 1), tied embeddings; 56 px tiles -> 4 tokens each.
    "internvl_300m": dict(seed=4, vision_variant="300m", n_heads=4, n_key_value_heads=4, tie_word_embeddings=True),
    # InternViT-6B style, GQA ratio 2, separate lm_head, 3 LM layers; 5.x runtime names.
    "internvl_6b": dict(
        seed=3, vision_variant="6b", n_layers=3, n_heads=4, n_key_value_heads=2, d_head=24,
        tie_word_embeddings=False, vision_heads=4, max_patches=4, key_layout="runtime",
    ),  # fmt: skip
}


# Qwen3-MoE language models (InternVL3.5-30B-A3B / 241B-A28B structure) with per-expert keys on
# disk, as 4.x -HF repos and transformers' own save_pretrained write them.
MOE_VARIANTS: dict[str, dict] = {
    # 8 experts, top-2, renormalised (as the real ones); GQA ratio 2; InternViT-300M style.
    "internvl_moe": dict(
        seed=6, vision_variant="300m", n_layers=2, n_heads=4, n_key_value_heads=2, num_experts=8,
        experts_per_token=2, d_mlp_expert=24, norm_topk_prob=True, key_layout="legacy",
    ),  # fmt: skip
    # 4 experts, top-1, not renormalised (the weight is the softmax probability); layer 1 of 3
    # dense (mlp_only_layers); InternViT-6B style; 5.x runtime names.
    "internvl_moe_top1": dict(
        seed=8, vision_variant="6b", n_layers=3, n_heads=4, n_key_value_heads=4, d_head=24, num_experts=4,
        experts_per_token=1, d_mlp_expert=32, norm_topk_prob=False, mlp_only_layers=(1,), vision_heads=4,
        max_patches=4, key_layout="runtime",
    ),  # fmt: skip
}


def _export_llava(get: Callable[[str], Path], out: Path) -> Path:
    return export_llava_original(get("llava_base"), out, out.with_name("llava_original_clip"))


def _export_internvl(get: Callable[[str], Path], out: Path) -> Path:
    return export_internvl_original(get("internvl_6b"), out)


TINY_CHECKPOINTS: dict[str, Callable[[Callable[[str], Path], Path], Path]] = {
    **{name: (lambda get, out, kw=kw: build_tiny_llava(out, **kw)) for name, kw in LLAVA_VARIANTS.items()},
    **{name: (lambda get, out, kw=kw: build_tiny_internvl(out, **kw)) for name, kw in INTERNVL_VARIANTS.items()},
    **{name: (lambda get, out, kw=kw: build_tiny_internvl(out, **kw)) for name, kw in MOE_VARIANTS.items()},
    "llava_original": _export_llava,
    "internvl_original": _export_internvl,
    "internvl_moe_original": lambda get, out: export_internvl_original(get("internvl_moe"), out),
}


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """The test photos (tests/assets/*.jpg) by file stem, as RGB PIL images."""
    return {path.stem: Image.open(path).convert("RGB") for path in sorted(ASSETS.glob("*.jpg"))}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`get(name)`: the directory of the named tiny checkpoint, built on first request."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = TINY_CHECKPOINTS[name](get, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session", params=sorted(LLAVA_VARIANTS))
def llava_dir(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint(request.param)


@pytest.fixture(scope="session", params=sorted(INTERNVL_VARIANTS))
def internvl_dir(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def llava_original_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("llava_original")


@pytest.fixture(scope="session")
def internvl_original_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("internvl_original")
