"""Scaling a published config down: widths, depths and head counts only; every other field as published.

Widths shrink 128-fold (a head's width 8-fold, head counts 8-fold, so a 4096-wide Llama with 32
heads of 128 becomes 32 wide with 4 heads of 8), depths 16-fold (at least 2 blocks). Vocabulary
sizes stay as published, so that every special token keeps its real id (32000 `<image>`, 151671
`<IMG_CONTEXT>`); so do image and patch sizes, so that the geometry (576 tokens per LLaVA image,
1025 patches and 256 tokens per InternVL tile) is the real one.
"""

from __future__ import annotations

import copy
import math

WIDTH, HEADS, HEAD_WIDTH, DEPTH = 128, 8, 8, 16
LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)


def depth(n: int) -> int:
    return max(2, math.ceil(n / DEPTH))


def heads(n: int) -> int:
    return max(1, n // HEADS)


def _scale_tower(d: dict, heads_key: str = "num_attention_heads") -> None:
    """A ViT (CLIP or InternViT) config in place: width = heads x head width, MLP in proportion."""
    n_heads = heads(d[heads_key])
    width = n_heads * max(1, d["hidden_size"] // d[heads_key] // HEAD_WIDTH)
    d["intermediate_size"] = d["intermediate_size"] * width // d["hidden_size"]
    d["hidden_size"], d[heads_key] = width, n_heads
    d["num_hidden_layers"] = depth(d["num_hidden_layers"])
    if "projection_dim" in d:
        d["projection_dim"] = max(4, d["projection_dim"] // WIDTH)


def _scale_llama(d: dict) -> None:
    """A Llama config in place (the 7B files leave the sizes at their defaults: state them)."""
    for key, value in LLAMA_DEFAULTS.items():
        d.setdefault(key, value)
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    d["hidden_size"] //= WIDTH
    d["intermediate_size"] //= WIDTH
    d["num_attention_heads"], d["num_key_value_heads"] = heads(d["num_attention_heads"]), heads(d["num_key_value_heads"])
    d["num_hidden_layers"] = depth(d["num_hidden_layers"])


def _scale_qwen3(d: dict) -> None:
    """A Qwen3 config in place: its head width is its own field (128 -> 16), independent of the width."""
    d["hidden_size"] //= WIDTH
    d["intermediate_size"] //= WIDTH
    d["head_dim"] //= HEADS
    d["num_attention_heads"], d["num_key_value_heads"] = heads(d["num_attention_heads"]), heads(d["num_key_value_heads"])
    d["num_hidden_layers"] = depth(d["num_hidden_layers"])
    if "max_window_layers" in d:
        d["max_window_layers"] = d["num_hidden_layers"]
    if "layer_types" in d:
        d["layer_types"] = d["layer_types"][: d["num_hidden_layers"]]


def scale_config(config: dict, fmt: str) -> dict:
    """The published `config.json` of a checkpoint in format `fmt` (or "clip": the CLIP tower's
    repository), scaled down."""
    c = copy.deepcopy(config)
    if fmt == "llava-hf":
        _scale_llama(c["text_config"])
        _scale_tower(c["vision_config"])
    elif fmt == "llava-original":
        _scale_llama(c)
        c["mm_hidden_size"] = scale_config_fragment_width(c["mm_hidden_size"])
    elif fmt == "clip":
        for key in ("text_config", "vision_config", "text_config_dict", "vision_config_dict"):
            _scale_tower(c[key])
        c["projection_dim"] = c["vision_config"]["projection_dim"]
    elif fmt == "internvl-hf":
        _scale_qwen3(c["text_config"])
        _scale_tower(c["vision_config"])
    elif fmt == "internvl-original":
        _scale_qwen3(c["llm_config"])
        _scale_tower(c["vision_config"])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return c


def scale_config_fragment_width(vision_width: int, vision_heads: int = 16) -> int:
    """The scaled width of a ViT `vision_width` wide with `vision_heads` heads (original LLaVA's
    `mm_hidden_size`, which names the CLIP tower's width)."""
    d = {"hidden_size": vision_width, "num_attention_heads": vision_heads, "intermediate_size": 4 * vision_width, "num_hidden_layers": 1}
    _scale_tower(d)
    return d["hidden_size"]
