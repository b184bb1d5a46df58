"""Shared by the circuit tests: a clean/corrupted pair on a tiny random model, in fp64.

The corrupted image is the clean photo with one rectangle painted over (an "object" removed),
so the two differ only there, as an object-removed pair does; the answer is teacher-forced."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from hooked_vlm import HookedVLM
from hooked_vlm.circuits import CircuitPair
from hooked_vlm.patching import answer_nll_metric

ANSWER = "[0.12, 0.30, 0.55, 0.91]"
PROMPT = "Where is the cat?"
BOX = (0.3, 0.25, 0.75, 0.7)  # the painted region, as fractions of the image


def painted(image: Image.Image, fill=(40, 160, 60)) -> Image.Image:
    out = image.copy()
    w, h = out.size
    ImageDraw.Draw(out).rectangle([BOX[0] * w, BOX[1] * h, BOX[2] * w, BOX[3] * h], fill=fill)
    return out


def box_pixels(image: Image.Image) -> tuple[float, float, float, float]:
    w, h = image.size
    return (BOX[0] * w, BOX[1] * h, BOX[2] * w, BOX[3] * h)


def load(tiny_checkpoint, name: str, dtype=torch.float64) -> HookedVLM:
    return HookedVLM.from_pretrained(tiny_checkpoint(name), dtype=dtype)


def make_pair(model, image: Image.Image, prompt: str = PROMPT, spans=None, strength: float = 1.0) -> CircuitPair:
    """`strength` < 1 blends the painted rectangle in (a shorter path from corrupted to clean)."""
    clean = model.prepare(image, prompt, answers=ANSWER)
    corrupted = model.prepare(Image.blend(image, painted(image), strength), prompt, answers=ANSWER)
    return CircuitPair(clean, corrupted, answer_nll_metric(clean), spans)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))
