"""Loaders for the on-disk SAE formats of the field, and SAELens's writer.

- SAELens: a directory with `cfg.json` and `sae_weights.safetensors` (`W_enc` `[d_in, d_sae]`,
  `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`, `threshold` for JumpReLU). Configs of SAELens 6
  (`metadata.hook_name`, `k`) and earlier (flat `hook_name`/`hook_point`,
  `activation_fn_str`/`activation_fn` with `activation_fn_kwargs.k`, heads flattened for a hook
  ending in `_z`) are both read; TopK's `rescale_acts_by_decoder_norm` is folded into the weights.
- EleutherAI sparsify (and its predecessor `sae`, as lmms-lab's LLaVA-NeXT SAEs): a directory per
  hookpoint (`model.layers.24`) with `cfg.json` (`d_in`, `num_latents` or `expansion_factor`,
  `k`, `signed`, `transcode`, ...) and `sae.safetensors` (`encoder.weight` `[d_sae, d_in]`,
  `encoder.bias`, `W_dec` `[d_sae, d_in]`, `b_dec`). TopK of ReLU(encoder(x - b_dec)).
- Qwen-Scope: `layer{n}.sae.pt`, a dict of `W_enc` `[d_sae, d_in]`, `b_enc`, `W_dec`
  `[d_in, d_sae]`, `b_dec`, read with `torch.load(weights_only=True)`. TopK of `x @ W_enc.T + b_enc`
  (no ReLU, no `b_dec` subtracted), on the residual stream after block n.
- A plain state dict (in memory, `.safetensors` or `.pt`), SAELens's key names or nn.Linear's
  (`encoder.weight`, `decoder.weight`, ...), either orientation.

No loader runs pickled code: `.pt` files go through `torch.load(weights_only=True)`, and a
payload that needs more than tensors is refused with a `ValueError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hooked_vlm.config import as_dtype
from hooked_vlm.saes.sae import SAE, SAEConfig

SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_ALIASES = {  # plain state dicts: our name <- names seen in the wild
    "W_enc": ("W_enc", "encoder.weight", "W_e"),
    "b_enc": ("b_enc", "encoder.bias", "b_e"),
    "W_dec": ("W_dec", "decoder.weight", "W_d"),
    "b_dec": ("b_dec", "decoder.bias", "b_d", "b_pre"),
    "threshold": ("threshold",),
}


# ----------------------------------------------------------------------------------- SAELens
def load_saelens(path: str | Path, *, hook_name: str | None = None, dtype=None, device="cpu") -> SAE:
    """An SAE saved by SAELens (`sae.save_model(path)`) or by `save_saelens`."""
    path = Path(path)
    cfg = _read_json(path / SAELENS_CFG)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    if (meta.get("hook_head_index") or cfg.get("hook_head_index")) is not None:
        raise NotImplementedError(f"{path}: SAEs on one head (hook_head_index) are not supported")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", False):
        raise NotImplementedError(f"{path}: normalize_activations={normalize!r} is not supported (only 'none')")
    if cfg.get("finetuning_scaling_factor"):
        raise NotImplementedError(f"{path}: finetuning_scaling_factor is not supported")
    architecture, k = _saelens_architecture(cfg, path)
    weights = _saelens_weights(path, cfg, architecture)
    hook_name = hook_name or meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    # SAELens before 6 wrote no reshape_activations: it flattened the heads of any hook ending in "_z"
    reshape = cfg.get("reshape_activations") or ("hook_z" if "reshape_activations" not in cfg and str(hook_name).endswith("_z") else "none")
    config = SAEConfig(
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        hook_name=hook_name,
        reshape_activations=reshape,
        dtype=_dtype(dtype, cfg.get("dtype"), weights["W_enc"].dtype),
        metadata={"format": "saelens", "path": str(path), "config": cfg},
    )
    return _build(config, weights, device, str(path))


def _saelens_weights(path: Path, cfg: dict, architecture: str) -> dict[str, Tensor]:
    """The weights file, in this library's terms: a training checkpoint's `log_threshold` as
    `threshold`, SAELens's all-ones `scaling_factor` dropped (SAELens drops it too), and TopK's
    `rescale_acts_by_decoder_norm` folded into the weights (exact: the pre-activations are
    multiplied, the activations divided, by each feature's decoder norm)."""
    weights = load_file(str(path / SAELENS_WEIGHTS))
    if "log_threshold" in weights:  # a training SAE's checkpoint
        weights["threshold"] = weights.pop("log_threshold").exp()
    scaling = weights.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise NotImplementedError(f"{path}: a scaling_factor other than ones (SAELens's finetuning_scaling_factor) is not supported")
    unknown = sorted(set(weights) - {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"})
    if unknown:
        raise NotImplementedError(f"{path}: weights {unknown} are not part of a {architecture} SAE this library computes")
    if cfg.get("rescale_acts_by_decoder_norm"):
        if architecture != "topk":
            raise NotImplementedError(f"{path}: rescale_acts_by_decoder_norm is supported for TopK SAEs only")
        norm = weights["W_dec"].float().norm(dim=-1)
        norm = torch.where(norm > 0, norm, 1.0)  # a dead feature's zero decoder row stays as it is
        weights["W_enc"] = (weights["W_enc"].float() * norm).to(weights["W_enc"].dtype)
        weights["W_dec"] = (weights["W_dec"].float() / norm[:, None]).to(weights["W_dec"].dtype)
        if "b_enc" in weights:
            weights["b_enc"] = (weights["b_enc"].float() * norm).to(weights["b_enc"].dtype)
    return weights


def _saelens_architecture(cfg: dict, path: Path) -> tuple[str, int | None]:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture == "topk" or (architecture == "standard" and activation == "topk"):
        k = cfg.get("k") or kwargs.get("k")
        if k is None:
            raise ValueError(f"{path}: a TopK SAE whose config gives no k (neither k nor activation_fn_kwargs.k)")
        return "topk", int(k)
    if architecture == "standard" and activation == "relu":
        return "relu", None
    if architecture == "jumprelu":
        return "jumprelu", None
    raise NotImplementedError(
        f"{path}: SAELens architecture {architecture!r} (activation {activation!r}) is not supported; "
        "supported: standard (ReLU), topk, jumprelu"
    )


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `sae` as SAELens 6 does: `cfg.json` and `sae_weights.safetensors` in `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    config = {
        "architecture": {"relu": "standard"}.get(cfg.architecture, cfg.architecture),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": cfg.reshape_activations,
        "metadata": {"hook_name": cfg.hook_name, "sae_lens_version": "6.0.0"},
    }
    if cfg.architecture == "topk":
        config["k"] = cfg.k
    if cfg.architecture == "topk" and cfg.signed:
        raise ValueError("SAELens has no signed TopK (it applies a ReLU after TopK): this SAE cannot be saved in its format")
    save_file({name: p.detach().contiguous().cpu() for name, p in sae.named_parameters()}, str(path / SAELENS_WEIGHTS))
    (path / SAELENS_CFG).write_text(json.dumps(config, indent=2))
    return path


# ----------------------------------------------------------------------------------- sparsify
def load_sparsify(path: str | Path, *, hookpoint: str | None = None, hook_name: str | None = None, dtype=None, device="cpu") -> SAE:
    """A sparsify SAE: `path` is its hookpoint's directory, or the directory (or hub repo) holding
    one directory per hookpoint with `hookpoint=` naming one. `hook_name` overrides the hook
    read from the hookpoint's name (`layers.N` -> `blocks.N.hook_resid_post`, `layers.N.mlp` ->
    `blocks.N.hook_mlp_out`, `layers.N.self_attn` -> `blocks.N.hook_attn_out`, `embed_tokens` ->
    `hook_embed`; a vision tower's -> `vision.blocks.N...`)."""
    path = _local(path, f"{hookpoint}/*" if hookpoint else None)
    if hookpoint is not None:
        path = path / hookpoint
    cfg = _read_json(path / "cfg.json")
    for unsupported in ("transcode", "skip_connection", "embed_skip", "gram_lookup"):
        if cfg.get(unsupported):
            raise NotImplementedError(f"{path}: sparsify coders with {unsupported}=True are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise NotImplementedError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    weights = load_file(str(path / SPARSIFY_WEIGHTS))
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg["expansion_factor"])
    config = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=int(cfg["k"]),
        signed=bool(cfg.get("signed", False)),
        apply_b_dec_to_input=True,
        hook_name=hook_name or sparsify_hook_name(path.name),
        dtype=_dtype(dtype, None, weights["encoder.weight"].dtype),
        metadata={"format": "sparsify", "path": str(path), "hookpoint": path.name, "config": cfg},
    )
    tensors = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights.get("encoder.bias"),
        "W_dec": weights["W_dec"],
        "b_dec": weights.get("b_dec"),
    }
    return _build(config, tensors, device, str(path))


def sparsify_hook_name(hookpoint: str) -> str:
    """This library's hook for a sparsify hookpoint (a Hugging Face module path)."""
    prefix = "vision." if "vision" in hookpoint else ""
    patterns = (
        (r"layers?\.(\d+)$", "blocks.{}.hook_resid_post"),
        (r"layers?\.(\d+)\.mlp$", "blocks.{}.hook_mlp_out"),
        (r"layers?\.(\d+)\.(self_attn|attention|attn)$", "blocks.{}.hook_attn_out"),
    )
    for pattern, name in patterns:
        match = re.search(pattern, hookpoint)
        if match:
            return prefix + name.format(match.group(1))
    if hookpoint.endswith("embed_tokens") and not prefix:
        return "hook_embed"
    raise ValueError(f"no hook of this library corresponds to sparsify hookpoint {hookpoint!r}: pass hook_name=")


# ----------------------------------------------------------------------------------- Qwen-Scope
def load_qwen_scope(path: str | Path, *, k: int | None = None, hook_name: str | None = None, dtype=None, device="cpu") -> SAE:
    """A Qwen-Scope `layer{n}.sae.pt`: TopK (no ReLU) on `blocks.{n}.hook_resid_post`. `k` is read
    from the release name in the path (`...-L0_50`) unless given."""
    path = Path(path)
    match = re.fullmatch(r"layer(\d+)\.sae\.pt", path.name)
    if hook_name is None and match is None:
        raise ValueError(f"{path.name} is not named layer{{n}}.sae.pt: pass hook_name=")
    if k is None:
        found = re.search(r"L0_(\d+)", str(path))
        if found is None:
            raise ValueError(f"the TopK k of {path} is not in its path (a Qwen-Scope release ends in -L0_50 or -L0_100): pass k=")
        k = int(found.group(1))
    state = _torch_load(path)
    d_sae, d_in = state["W_enc"].shape
    config = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=k,
        signed=True,
        apply_b_dec_to_input=False,
        hook_name=hook_name or f"blocks.{match.group(1)}.hook_resid_post",
        dtype=_dtype(dtype, None, state["W_enc"].dtype),
        metadata={"format": "qwen-scope", "path": str(path)},
    )
    tensors = {"W_enc": state["W_enc"].T, "b_enc": state.get("b_enc"), "W_dec": state["W_dec"].T, "b_dec": state.get("b_dec")}
    return _build(config, tensors, device, str(path))


# ----------------------------------------------------------------------------------- plain
def from_state_dict(
    state_dict: Mapping[str, Tensor] | str | Path,
    *,
    hook_name: str,
    architecture: str = "relu",
    k: int | None = None,
    signed: bool = False,
    apply_b_dec_to_input: bool = True,
    reshape_activations: str = "none",
    d_in: int | None = None,
    dtype=None,
    device="cpu",
) -> SAE:
    """An SAE from a plain state dict (a mapping, or a `.safetensors` / `.pt` file). Keys:
    SAELens's (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`; either orientation, SAELens's
    `[d_in, d_sae]` / `[d_sae, d_in]` when square) or nn.Linear's (`encoder.weight`,
    `encoder.bias`, `decoder.weight`, `decoder.bias`). `d_in` is read from `b_dec` unless given."""
    source = str(state_dict) if isinstance(state_dict, (str, Path)) else "the state dict"
    if isinstance(state_dict, (str, Path)):
        path = Path(state_dict)
        state_dict = load_file(str(path)) if path.suffix == ".safetensors" else _torch_load(path)
    keys = {ours: next((n for n in names if n in state_dict), None) for ours, names in _ALIASES.items()}
    missing = [name for name in ("W_enc", "W_dec") if keys[name] is None]
    if missing:
        raise KeyError(f"{source} holds no {missing}; its keys are {sorted(state_dict)}")
    tensors = {ours: None if key is None else state_dict[key] for ours, key in keys.items()}
    if d_in is None:
        if tensors["b_dec"] is None:
            raise ValueError(f"{source} has no b_dec to read the input width from: pass d_in=")
        d_in = tensors["b_dec"].shape[0]
    tensors["W_enc"] = _oriented(tensors["W_enc"], keys["W_enc"], d_in, first=True)
    tensors["W_dec"] = _oriented(tensors["W_dec"], keys["W_dec"], d_in, first=False)
    config = SAEConfig(
        d_in=d_in,
        d_sae=tensors["W_enc"].shape[1],
        architecture=architecture,
        k=k,
        signed=signed,
        apply_b_dec_to_input=apply_b_dec_to_input,
        hook_name=hook_name,
        reshape_activations=reshape_activations,
        dtype=_dtype(dtype, None, tensors["W_enc"].dtype),
        metadata={"format": "state_dict", "path": source},
    )
    return _build(config, tensors, device, source)


def _oriented(tensor: Tensor, key: str, d_in: int, first: bool) -> Tensor:
    """`W_enc` as `[d_in, d_sae]` (`first`) or `W_dec` as `[d_sae, d_in]`."""
    if key.endswith(".weight"):  # nn.Linear stores [out, in]: the transpose of SAELens's layout
        return tensor.T
    axis = 0 if first else 1
    if tensor.shape[axis] == d_in:
        return tensor
    if tensor.shape[1 - axis] == d_in:
        return tensor.T
    raise ValueError(f"{key} has shape {tuple(tensor.shape)}, with no axis of the input width {d_in}")


# ----------------------------------------------------------------------------------- any
def load_sae(path: str | Path, **kwargs: Any) -> SAE:
    """Any supported format, recognised by its files: a SAELens directory, a sparsify directory,
    a Qwen-Scope `layer{n}.sae.pt`, or a plain state dict file (which needs `hook_name=` and the
    architecture). Keyword arguments go to the format's loader."""
    path = Path(path)
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, **kwargs)
    if (path / SPARSIFY_WEIGHTS).is_file() or kwargs.get("hookpoint"):
        return load_sparsify(path, **kwargs)
    if re.fullmatch(r"layer\d+\.sae\.pt", path.name):
        return load_qwen_scope(path, **kwargs)
    if path.is_file() and path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        return from_state_dict(path, **kwargs)
    hookpoints = sorted(p.parent.name for p in path.glob(f"*/{SPARSIFY_WEIGHTS}")) if path.is_dir() else []
    if hookpoints:
        raise ValueError(f"{path} holds one sparsify SAE per hookpoint: pass hookpoint= one of {hookpoints}")
    raise ValueError(
        f"{path} is no SAE this library reads: expected a SAELens directory ({SAELENS_CFG} + {SAELENS_WEIGHTS}), "
        f"a sparsify directory (cfg.json + {SPARSIFY_WEIGHTS}), a Qwen-Scope layer{{n}}.sae.pt or a state dict file"
    )


# ----------------------------------------------------------------------------------- helpers
def _build(config: SAEConfig, tensors: dict[str, Tensor | None], device, source: str) -> SAE:
    tensors = {name: None if t is None else t.to(config.dtype) for name, t in tensors.items()}
    try:
        return SAE.from_tensors(config, **tensors, device=device)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _torch_load(path: Path) -> dict[str, Tensor]:
    """`torch.load` that runs no pickled code: a file needing more than tensors is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is a pickle that holds code or objects beyond tensors; it was refused unread "
            f"(torch.load(weights_only=True)). Load only files from sources you trust, converted to "
            f"plain tensors. ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return dict(state)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    return json.loads(path.read_text())


def _dtype(requested, named: str | None, stored: torch.dtype) -> torch.dtype:
    if requested is not None:
        return as_dtype(requested)
    return as_dtype(named) if named else stored


def _local(path: str | Path, allow_patterns: str | None) -> Path:
    """A local directory as given, or a Hugging Face hub repo id downloaded (only the files
    matching `allow_patterns`)."""
    if Path(path).exists():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), allow_patterns=allow_patterns))
