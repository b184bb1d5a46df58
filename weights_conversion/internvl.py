"""InternVL-3.5 checkpoints: the -HF format and the original remote-code format."""

from __future__ import annotations


def is_internvl_hf(config: dict) -> bool:
    return config.get("model_type") == "internvl"


def is_internvl_original(config: dict) -> bool:
    return config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or [])
