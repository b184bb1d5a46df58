"""Checkpoint formats -> HookedVLM.

One module per family (`llava.py`, `internvl.py`), each handling that family's formats; `rules.py`
holds the renaming tables they share and `io.py` the lazy readers. `load_pretrained` detects the
format from `config.json` and dispatches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weights_conversion.hub import HubOptions, resolve_directory
from weights_conversion.io import (
    CheckpointReader,
    ConversionError,
    Plan,
    check_plan,
    load_plan,
    read_json,
)
from weights_conversion.placement import Placement

__all__ = ["load_pretrained", "checkpoint_directory", "detect_format", "ConversionError", "CheckpointReader", "HubOptions"]
SUPPORTED = (
    "LlavaForConditionalGeneration (llava-hf/llava-1.5-*-hf), LlavaLlamaForCausalLM (liuhaotian/llava-v1.5-*), "
    "InternVLForConditionalGeneration (OpenGVLab/InternVL3_5-*-HF), InternVLChatModel (OpenGVLab/InternVL3_5-*)"
)


def detect_format(config: dict) -> str:
    """"llava-hf", "llava-original", "internvl-hf" or "internvl-original" from a `config.json`."""
    from weights_conversion import internvl, llava

    if llava.is_llava_original(config):
        return "llava-original"
    if llava.is_llava_hf(config):
        return "llava-hf"
    if internvl.is_internvl_hf(config):
        return "internvl-hf"
    if internvl.is_internvl_original(config):
        return "internvl-original"
    raise ValueError(
        f"unknown architecture: model_type={config.get('model_type')!r}, architectures={config.get('architectures')}; "
        f"supported: {SUPPORTED}"
    )


def checkpoint_directory(name_or_path: str | Path, hub: HubOptions = HubOptions()) -> Path:
    """The local directory of a shipped toy model's name, a local path or a hub id."""
    from hooked_vlm.toy_models import toy_model_path

    return toy_model_path(str(name_or_path)) or resolve_directory(name_or_path, hub)


def load_pretrained(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: Any = "cpu",
    device_map: dict[str, Any] | str | None = None,
    max_memory: dict | None = None,
    hub: HubOptions = HubOptions(),
):
    """Load any supported checkpoint as a `HookedVLM` (see `HookedVLM.from_pretrained`)."""
    from hooked_vlm.config import as_dtype

    directory = checkpoint_directory(name_or_path, hub)
    raw_config = read_json(directory / "config.json")
    if raw_config is None:
        raise FileNotFoundError(f"{directory} has no config.json")
    fmt = detect_format(raw_config)
    if fmt.startswith("llava"):
        from weights_conversion import llava as module
    else:
        from weights_conversion import internvl as module
    dtype = checkpoint_dtype(raw_config, directory) if dtype == "auto" else as_dtype(dtype)
    model = module.load(directory, raw_config, dtype, Placement(device, device_map, max_memory), hub)
    if fmt.endswith("-hf"):
        _apply_generation_config(model, directory)
    return model


def checkpoint_dtype(raw_config: dict, directory: Path) -> torch.dtype:
    """`dtype="auto"`: the dtype the checkpoint was saved in, as transformers reads it: the config's
    `dtype` (`torch_dtype` before transformers 5, also inside `text_config`/`llm_config`), else the
    dtype of the first floating-point tensor of the weights."""
    from hooked_vlm.config import as_dtype

    for config in (raw_config, raw_config.get("text_config") or {}, raw_config.get("llm_config") or {}):
        name = config.get("dtype") or config.get("torch_dtype")
        if name:
            return as_dtype(name)
    reader = CheckpointReader.from_directory(directory)
    for key in reader.keys():
        tensor = reader.get(key)
        if tensor.is_floating_point():
            return tensor.dtype
    raise ConversionError(f"{directory}: dtype='auto' found no dtype in config.json and no floating-point weight")


def _apply_generation_config(model, directory: Path) -> None:
    """Stop and pad where Hugging Face's `generate` does: with the `eos_token_id` (one or
    several) and `pad_token_id` of `generation_config.json` when it has them, else the config's."""
    from dataclasses import replace

    generation = read_json(directory / "generation_config.json") or {}
    eos, pad = generation.get("eos_token_id"), generation.get("pad_token_id")
    if eos is not None:
        model.cfg = replace(model.cfg, eos_token_id=tuple(eos) if isinstance(eos, list) else int(eos))
    if pad is not None:
        model.cfg = replace(model.cfg, pad_token_id=int(pad))


def assemble(
    cfg, plan: Plan, readers: dict[str, CheckpointReader | None], tokenizer_dir: Path, preprocessing, dtype, placement: Placement,
    tokenizer=None,
):
    """Build the model on the meta device, check the plan against it, place it (`placement`: a
    device, a device map, or a map accelerate computes from the meta model's sizes), then fill it
    tensor by tensor. `tokenizer`: an already loaded tokenizer (else loaded from `tokenizer_dir`)."""
    from transformers import AutoTokenizer

    from hooked_vlm.model import HookedVLM

    with torch.device("meta"):
        model = HookedVLM(cfg.with_dtype(dtype))
    shapes = {name: {k: r.shape(k) for k in r.keys()} for name, r in readers.items() if r is not None}
    check_plan(plan, model, shapes)
    placement = placement if isinstance(placement, Placement) else Placement(placement)
    placement.resolve(model)
    if cfg.tie_word_embeddings and placement("embed.weight") != placement("unembed.weight"):
        raise ValueError("tied embeddings need the embedding and the unembedding on the same device")
    load_plan(plan, model, readers, dtype, placement)
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    model.hf_device_map = placement.hf_device_map  # as transformers exposes the map it used
    model.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(tokenizer_dir)
    model.preprocessing = preprocessing
    return model.eval()
