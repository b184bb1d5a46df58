"""Shared pieces: constants, random weights, checkpoint key layouts, file helpers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    PreTrainedModel,
)

KeyLayout = Literal["saved", "legacy", "runtime"]


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as in both families' preprocessor configs


# ----------------------------------------------------------------------------- random weights


def _is_embedding_table(name: str) -> bool:
    return re.search(r"(position_embeddings?|class_embedding|cls_token)(\.weight)?$", name) is not None


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0, gain: float = 2.0) -> torch.nn.Module:
    """Overwrite every parameter with a deterministic draw that keeps activations O(1) and logits
    far from flat: matrices (token embeddings and lm_head included, each expert of a stacked
    `[expert, out, in]` tensor on its own) N(0, gain²/fan_in), position
    and class embeddings N(0, 1), norm weights 1 + N(0, 0.2²), layer-scale lambdas 0.5 + N(0, 0.2²),
    biases N(0, 0.1²). Parameters are visited in name order with one seeded generator, so the
    result depends only on `seed` and the parameter names and shapes; tied parameters are drawn once."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if re.search(r"lambda_\d$", name):
            value = 0.5 + 0.2 * noise
        elif _is_embedding_table(name):
            value = noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif param.ndim <= 1:  # LayerNorm / RMSNorm weights (incl. q/k norms), scalars (CLIP's logit_scale)
            value = 1.0 + 0.2 * noise
        elif re.search(r"experts\.(gate_up_proj|down_proj)$", name):  # [expert, out, in]: per-expert fan-in
            value = noise * (gain / math.sqrt(param.shape[-1]))
        else:
            value = noise * (gain / math.sqrt(param[0].numel()))
        param.copy_(value.to(param.dtype))
    return model


# -------------------------------------------------------------------------------- key layouts

_TO_RUNTIME = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
)


def runtime_key(key: str) -> str:
    """Any on-disk Llava/InternVL key (legacy, 5.x-saved or runtime) -> transformers 5.x runtime name."""
    for pattern, replacement in _TO_RUNTIME:
        key = re.sub(pattern, replacement, key)
    return key


def legacy_key(key: str, *, clip_tower: bool) -> str:
    """Runtime name -> the 4.x hub layout (llava-hf, InternVL-HF). Only CLIP towers carry the
    `vision_model.` prefix on disk."""
    vision_prefix = "vision_tower.vision_model." if clip_tower else "vision_tower."
    for pattern, replacement in (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", vision_prefix),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ):
        key = re.sub(pattern, replacement, key)
    return key


def _rename_checkpoint_keys(path: Path, rename: Callable[[str], str]) -> None:
    """Rewrite the tensor names of every safetensors file in `path` (and its index, if sharded)."""
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        save_file({rename(k): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))


def apply_key_layout(path: Path, key_layout: KeyLayout, *, clip_tower: bool) -> None:
    if key_layout == "runtime":
        _rename_checkpoint_keys(path, runtime_key)
    elif key_layout == "legacy":
        _rename_checkpoint_keys(path, lambda key: legacy_key(runtime_key(key), clip_tower=clip_tower))
    elif key_layout != "saved":
        raise ValueError(f"key_layout must be 'saved', 'legacy' or 'runtime', not {key_layout!r}")


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_expert_tensors(path: Path) -> None:
    """Rewrite a single-file checkpoint's per-expert tensors (`...mlp.experts.{e}.{gate,up,down}_proj.weight`,
    as transformers' save_pretrained writes them) into the fused tensors transformers 5.x holds in
    memory: `...mlp.experts.gate_up_proj` `[expert, 2 * d_mlp, d_model]` (every gate, then every
    up: `MergeModulelist` + `Concatenate(dim=1)`) and `...mlp.experts.down_proj` `[expert, d_model, d_mlp]`."""
    file = Path(path) / "model.safetensors"
    tensors = load_file(file)
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key in [k for k in tensors if _PER_EXPERT.match(k)]:
        prefix, expert, kind = _PER_EXPERT.match(key).groups()
        experts.setdefault(prefix, {}).setdefault(kind, {})[int(expert)] = tensors.pop(key)
    for prefix, kinds in experts.items():
        stacked = {kind: torch.stack([by_expert[e] for e in sorted(by_expert)]) for kind, by_expert in kinds.items()}
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([stacked["gate"], stacked["up"]], dim=1)
        tensors[f"{prefix}.down_proj"] = stacked["down"]
    save_file(tensors, file, metadata={"format": "pt"})


def load_runtime_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF Llava/InternVL checkpoint directory, under their 5.x runtime names,
    whatever the on-disk layout."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    return {runtime_key(key): tensor for file in files for key, tensor in load_file(file).items()}


# -------------------------------------------------------------------------------- file helpers


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _update_json(file: Path, **fields) -> None:
    data = json.loads(file.read_text())
    data.update(fields)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_model(model: PreTrainedModel, path: Path, dtype: torch.dtype) -> None:
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(path)


def _save_sharded(tensors: dict[str, torch.Tensor], shards: list[list[str]], path: Path, fmt: str) -> None:
    """Write `tensors` split as `shards` (lists of keys) in HF's sharded naming, plus the index:
    fmt "bin" -> pytorch_model-0000i-of-0000n.bin, "safetensors" -> model-0000i-of-0000n.safetensors."""
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        filename = f"{stem}-{i:05d}-of-{len(shards):05d}.{fmt}"
        shard = {key: tensors[key].contiguous().clone() for key in keys}  # clone: never save a whole storage
        if fmt == "bin":
            torch.save(shard, path / filename)
        else:
            save_file(shard, path / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, filename)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / f"{stem}.{fmt}.index.json").write_text(json.dumps(index, indent=2) + "\n")
