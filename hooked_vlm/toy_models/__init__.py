"""Tiny models trained on the synthetic localization task, shipped inside the package so that
everything runs offline. `toy_model_path(name)` resolves a shipped model's name to its directory.

Shipped (each a Hugging Face checkpoint directory with its own tokenizer, processor and chat
template, plus the `training.json` of the run that made it):

- `toy-llava`: `LlavaForConditionalGeneration` (CLIP-style tower + Llama LM), pad image mode.
- `toy-internvl`: `InternVLForConditionalGeneration` (InternViT-300M-style tower, pixel shuffle,
  Qwen3 LM), dynamic tiling with a thumbnail.

    model = HookedVLM.from_pretrained("toy-llava")
    hf = LlavaForConditionalGeneration.from_pretrained(toy_model_path("toy-llava"))

Each was trained in stages, every later one continuing the last (`train.py --init-from`): 8 for
toy-llava, 6 for toy-internvl. The commands that made them are in `spec.py`'s docstring, and each
`training.json` records every stage (`spec.py`: data, sizes and recipe; `train.py`: the loop;
`evaluate.py`: held-out metrics).
"""

from __future__ import annotations

from pathlib import Path

TOY_MODELS_DIR = Path(__file__).parent


def available_toy_models() -> list[str]:
    return sorted(p.name for p in TOY_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def toy_model_path(name: str) -> Path | None:
    """The directory of a shipped toy model, or None if `name` is not one."""
    path = TOY_MODELS_DIR / name
    return path if "/" not in name and (path / "config.json").is_file() else None


def suggest_toy_model(name: str) -> str | None:
    """The shipped toy model a misspelt `name` most likely meant ("toy-lava" -> "toy-llava"), or None."""
    import difflib

    close = difflib.get_close_matches(name, available_toy_models(), n=1, cutoff=0.6)
    return close[0] if close else None


def toy_dataset(name_or_path: str | Path, n: int, *, seed: int = 0, split: str = "test"):
    """Synthetic images from the distribution a toy model was trained on (its `training.json`
    records it; use a split other than "train"/"val" for held-out data). A directory without one
    gets the default `SyntheticLocalization` distribution."""
    import json

    from hooked_vlm.data.synthetic import SyntheticLocalization

    directory = toy_model_path(str(name_or_path)) or Path(name_or_path)
    record = directory / "training.json"
    data = json.loads(record.read_text())["spec"]["data"] if record.is_file() else {}
    if "image_sizes" in data:
        data["image_sizes"] = tuple(tuple(size) for size in data["image_sizes"])
    return SyntheticLocalization(n, seed, split=split, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


MEAN_IMAGES = 64  # images averaged for a toy's mean visual embedding (64 image tokens each on toy-llava)


def toy_mean_embedding(model, name_or_path: str | Path, n: int = MEAN_IMAGES, *, seed: int = 0, progress: bool = False):
    """The mean visual embedding (`interventions.compute_mean_embedding`) over `n` images of the
    toy's held-out "mean" split: what the paper's ImageNet-val mean is to a real model, and no
    image of any other split."""
    from hooked_vlm import interventions as iv

    images = [item.image for item in toy_dataset(name_or_path, n, seed=seed, split="mean")]
    return iv.compute_mean_embedding(model, images, progress=progress)
