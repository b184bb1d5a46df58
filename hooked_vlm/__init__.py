"""hooked_vlm: LLaVA-1.5 and InternVL-3.5 as TransformerLens-style hooked models."""

from hooked_vlm.allocator import keep_freed_memory, release_freed_memory
from hooked_vlm.config import HookedVLMConfig, TransformerConfig
from hooked_vlm.inputs import ImageLayout, ViewGeometry, VLMInput
from hooked_vlm.model import HookedVLM
from hooked_vlm.parity import ParityReport, check_parity

__all__ = [
    "HookedVLM",
    "HookedVLMConfig",
    "ImageLayout",
    "ParityReport",
    "TransformerConfig",
    "VLMInput",
    "ViewGeometry",
    "check_parity",
    "keep_freed_memory",
    "release_freed_memory",
]
