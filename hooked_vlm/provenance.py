"""What a saved result records about how it was made, and the checks made when it is read back.

A run manifest, a mean embedding, a probe table or a control-set manifest is only meaningful for
the model, the images and the preprocessing it was computed with. Each records:

- `model_identity(model)`: the checkpoint's name, family and format, an architecture hash and the
  whole config, the dtype, a few weights of the projector's output layer (`weights_sample`), the
  preprocessing in force and the prompt settings (`hooked_vlm.prompt_settings`: image mode, tile
  limit, template). Two loads are the same model when their architecture hash matches and their
  weights samples agree to rounding (so a bf16 load of a checkpoint is the same model as its fp32
  load, and a fine-tune of it is not); a run directory compares every field (`hooked_vlm.runs`);
- `preprocessing_settings(model)`: every field of `model.preprocessing` (image mode, tiling,
  template, normalisation ...) as `model.prepare` uses it, the prompt settings applied;
  `with_preprocessing` overrides them for the duration of a block;
- the images, through `hooked_vlm.data.collections` (count and a digest of the file list).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

WEIGHTS_SAMPLE_SIZE = 16
# bf16 keeps 8 significant bits (relative rounding up to 2**-8): two loads of one checkpoint in
# different dtypes agree within this; two different checkpoints do not (their weights differ by
# far more than a percent somewhere among the sampled ones)
WEIGHTS_RTOL = 2e-2

# overrides of `model.preprocessing`: a mapping of field -> value, or a function of the model
# giving one (one setting across families, e.g. the paper's: pad for LLaVA, 6 tiles for InternVL)
Preprocessing = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None


def model_fingerprint(model) -> tuple[str, str]:
    """(hash, description) of the model's architecture and checkpoint format. Two checkpoints of
    one architecture share it; a different width, depth or family does not."""
    cfg, text = model.cfg, model.cfg.text
    description = (
        f"{cfg.family} {cfg.checkpoint_format}: d_model={text.d_model} n_layers={text.n_layers} "
        f"n_heads={text.n_heads} d_vocab={text.d_vocab} vision d_model={cfg.vision.d_model}"
    )
    fields = repr((description, text.d_head, text.d_mlp, cfg.vision.n_layers, cfg.vision.image_size, cfg.downsample_ratio))
    return hashlib.sha1(fields.encode()).hexdigest()[:16], description


def weights_sample(model, n: int = WEIGHTS_SAMPLE_SIZE) -> list[float]:
    """`n` evenly spaced entries of the projector's output weight: what tells two checkpoints of
    one architecture apart (the projector is what every image token passes through)."""
    flat = model.projector.linear_2.weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, n).round().long().to(flat.device)
    return [float(v) for v in flat[index].float().cpu()]


def model_identity(model, name_or_path: str | None = None) -> dict[str, Any]:
    """The model, as a result records it (see the module docstring). `name_or_path`: the name to
    record (e.g. a command line's absolute path), else what `from_pretrained` was given."""
    from hooked_vlm.prompt_settings import effective_settings
    from hooked_vlm.runs.manifest import describe

    fingerprint, description = model_fingerprint(model)
    return {
        "name": name_or_path or getattr(model, "name_or_path", None) or description,
        "family": model.cfg.family,
        "checkpoint_format": model.cfg.checkpoint_format,
        "architecture": fingerprint,
        "description": description,
        "dtype": str(model.dtype).removeprefix("torch."),
        "config": describe(model.cfg),
        "weights_sample": weights_sample(model),
        "preprocessing": preprocessing_settings(model),
        "prompt_settings": effective_settings(model),
    }


def same_model(recorded: Mapping[str, Any], model) -> bool:
    """Whether `recorded` (a `model_identity`) describes `model`, whatever its dtype or name."""
    current = model_identity(model)
    if recorded.get("architecture") != current["architecture"]:
        return False
    a, b = torch.tensor(recorded.get("weights_sample", [])), torch.tensor(current["weights_sample"])
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=WEIGHTS_RTOL, atol=1e-6))


def check_same_model(recorded: Mapping[str, Any], model, what: str) -> None:
    """ValueError naming both models when `what` (e.g. "the mean in mean.pt") was computed on
    another model than `model`."""
    if not same_model(recorded, model):
        current = model_identity(model)
        raise ValueError(
            f"{what} was computed on {_describe(recorded)}, not on this model, {_describe(current)}"
            f"{'' if recorded.get('architecture') != current['architecture'] else ' (same architecture, other weights)'}"
        )


def _describe(identity: Mapping[str, Any]) -> str:
    name, description = identity.get("name"), identity.get("description", "")
    return f"{name} ({description})" if name and name != description else str(description or name)


# ---------------------------------------------------------------------------------- preprocessing
def preprocessing_settings(model) -> dict[str, Any]:
    """Every field of `model.preprocessing` as `model.prepare` uses it (the prompt settings
    applied), JSON-ready (tuples as lists)."""
    pre = model.preprocessing
    if pre is None:
        return {}
    settings = model.prompt_settings.given()
    return {f.name: _plain(settings.get(f.name, getattr(pre, f.name))) for f in dataclasses.fields(pre)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_preprocessing(model, preprocessing: Preprocessing) -> dict[str, Any]:
    """The overrides `preprocessing` asks of this model (a function is called with it; a
    `PromptSettings` gives its set fields); a field the model's preprocessing does not have is a
    ValueError naming the ones it has."""
    from hooked_vlm.prompt_settings import PromptSettings

    overrides = preprocessing(model) if callable(preprocessing) else preprocessing
    overrides = overrides.given() if isinstance(overrides, PromptSettings) else dict(overrides or {})
    known = [f.name for f in dataclasses.fields(model.preprocessing)] if model.preprocessing is not None else []
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"{model.cfg.family} preprocessing has no setting {', '.join(unknown)}; it has {', '.join(known)} "
            "(for models of several families pass a function of the model)"
        )
    return overrides


@contextlib.contextmanager
def with_preprocessing(model, preprocessing: Preprocessing) -> Iterator[dict[str, Any]]:
    """Run the block with `model.preprocessing` overridden (every `model.prepare` sees it), and
    restore it on exit, also when the block raises. Yields the settings in force. The prompt
    settings among the overrides (image mode, tile limit, template) are also set on
    `model.prompt_settings` (checked, see `hooked_vlm.prompt_settings`), which `prepare` reads first."""
    from hooked_vlm.prompt_settings import PromptSettings

    overrides = resolve_preprocessing(model, preprocessing)
    prompt = {k: overrides[k] for k in [f.name for f in dataclasses.fields(PromptSettings)] if k in overrides}
    original, original_settings = model.preprocessing, model.prompt_settings
    try:
        if prompt:
            model.use_settings(**prompt)
        if overrides:
            model.preprocessing = dataclasses.replace(original, **overrides)
        yield preprocessing_settings(model)
    finally:
        model.preprocessing, model.prompt_settings = original, original_settings


def code_version() -> str:
    try:
        return importlib.metadata.version("hooked_vlm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


