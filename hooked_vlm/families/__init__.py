"""Model families. A family is data plus a few small functions: config mapping, image
preprocessing and layout, prompt template. Adding one means one file here and one in
`weights_conversion/`."""

from __future__ import annotations

from types import ModuleType

FAMILIES = ("llava", "internvl")


def family_module(family: str) -> ModuleType:
    if family == "llava":
        from hooked_vlm.families import llava

        return llava
    if family == "internvl":
        from hooked_vlm.families import internvl

        return internvl
    raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
