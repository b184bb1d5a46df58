"""Tiny models trained on the synthetic localization task, shipped inside the package so that
everything runs offline. `toy_model_path(name)` resolves a shipped model's name to its directory."""

from __future__ import annotations

from pathlib import Path

TOY_MODELS_DIR = Path(__file__).parent


def available_toy_models() -> list[str]:
    return sorted(p.name for p in TOY_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def toy_model_path(name: str) -> Path | None:
    """The directory of a shipped toy model, or None if `name` is not one."""
    path = TOY_MODELS_DIR / name
    return path if "/" not in name and (path / "config.json").is_file() else None
