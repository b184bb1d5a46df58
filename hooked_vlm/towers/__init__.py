"""The vision tower and the projector (the language model's parts live on HookedVLM itself, so
that its hooks carry TransformerLens's top-level names: `blocks.{l}...`, `ln_final`, ...)."""

from hooked_vlm.towers.projector import Projector, pixel_shuffle
from hooked_vlm.towers.vision import VisionTower

__all__ = ["Projector", "VisionTower", "pixel_shuffle"]
