"""Qwen-Scope's Qwen3 SAEs on InternVL-3.5's language model.

InternVL3.5-2B, -8B and -30B-A3B run the Qwen3-1.7B, Qwen3-8B and Qwen3-30B-A3B architectures as
their language models (reference/ARCHITECTURES.md §2.1), so Qwen-Scope's residual-stream SAEs for
those Qwen3 base models (the Qwen team's `Qwen/SAE-Res-Qwen3-*` releases, 2026-05; one
`layer{n}.sae.pt` per layer, n = 0 .. n_layers - 1, TopK) read InternVL3.5's residual stream:
file `layer{n}.sae.pt` reconstructs the output of block n, `blocks.{n}.hook_resid_post` here.

They were trained on the Qwen3 *base* models' text activations; InternVL3.5 fine-tuned those
weights on images and text. How well they transfer, image tokens and text tokens apart, is
what `reconstruction_report` measures — check it before reading features.

    from hooked_vlm import saes
    release = saes.qwen_scope_releases(model)[0]        # the releases that fit this model
    sae = saes.load_qwen_scope_layer(release.repo, layer=14, model=model)   # downloads layer14.sae.pt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hooked_vlm.saes.formats import load_qwen_scope
from hooked_vlm.saes.sae import SAE


@dataclass(frozen=True)
class QwenScopeRelease:
    repo: str  # the Hugging Face repo of the SAEs
    base_model: str  # the Qwen3 model they were trained on
    internvl: tuple[str, ...]  # InternVL3.5 checkpoints whose language model has its architecture
    d_model: int
    n_layers: int
    d_sae: int
    k: int


def _release(size: str, internvl: str, d_model: int, n_layers: int, width: str, d_sae: int, k: int) -> QwenScopeRelease:
    names = tuple(f"OpenGVLab/InternVL3_5-{internvl}{suffix}" for suffix in ("", "-HF", "-Instruct", "-MPO", "-Pretrained"))
    return QwenScopeRelease(f"Qwen/SAE-Res-Qwen3-{size}-Base-{width}-L0_{k}", f"Qwen/Qwen3-{size}-Base", names, d_model, n_layers, d_sae, k)


QWEN_SCOPE_RELEASES: tuple[QwenScopeRelease, ...] = (
    _release("1.7B", "2B", 2048, 28, "W32K", 32768, 50),
    _release("1.7B", "2B", 2048, 28, "W32K", 32768, 100),
    _release("8B", "8B", 4096, 36, "W64K", 65536, 50),
    _release("8B", "8B", 4096, 36, "W64K", 65536, 100),
    _release("30B-A3B", "30B-A3B", 2048, 48, "W32K", 32768, 50),
    _release("30B-A3B", "30B-A3B", 2048, 48, "W128K", 131072, 100),
)


def qwen_scope_hook_name(layer: int) -> str:
    """The hook Qwen-Scope's `layer{layer}.sae.pt` reads: the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def qwen_scope_releases(model_or_name) -> list[QwenScopeRelease]:
    """The Qwen-Scope releases that fit an InternVL3.5 checkpoint, given by hub name
    ("OpenGVLab/InternVL3_5-8B-HF") or as a loaded `HookedVLM` (matched by its language model's
    width and depth). Empty when none fits."""
    if isinstance(model_or_name, (str, Path)):
        name = str(model_or_name).rstrip("/")
        return [r for r in QWEN_SCOPE_RELEASES if name in r.internvl]
    cfg = model_or_name.cfg
    if cfg.family != "internvl":
        return []
    return [r for r in QWEN_SCOPE_RELEASES if (r.d_model, r.n_layers) == (cfg.text.d_model, cfg.text.n_layers)]


def release_of(repo_or_path: str | Path) -> QwenScopeRelease | None:
    """The release a repo id, or a path inside a downloaded release, belongs to (None if none)."""
    text = str(repo_or_path)
    for release in QWEN_SCOPE_RELEASES:
        if release.repo in text or release.repo.replace("/", "--") in text:  # the hub cache's folder name
            return release
    return None


def load_qwen_scope_layer(repo_or_dir: str | Path, layer: int, *, model=None, k: int | None = None, dtype=None, device="cpu") -> SAE:
    """`layer{layer}.sae.pt` of a Qwen-Scope release: from a local directory holding it, or
    downloaded from the hub by repo id. With `model`, the SAE is checked to fit it (width,
    layer in range) before anything is read. `k` defaults to the release's."""
    release = release_of(repo_or_dir)
    if model is not None:
        _check_fits(model, layer, release)
    directory, filename = Path(repo_or_dir), f"layer{layer}.sae.pt"
    if directory.is_dir():
        path = directory / filename
    else:
        if release is None:
            raise ValueError(f"{repo_or_dir} is neither a directory nor one of {[r.repo for r in QWEN_SCOPE_RELEASES]}")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(release.repo, filename))
    k = k if k is not None else (release.k if release is not None else None)
    sae = load_qwen_scope(path, k=k, dtype=dtype, device=device)
    if model is not None and sae.cfg.d_in != model.cfg.text.d_model:
        raise ValueError(f"{path} reads {sae.cfg.d_in} features; this model's residual stream has {model.cfg.text.d_model}")
    return sae


def _check_fits(model, layer: int, release: QwenScopeRelease | None) -> None:
    n_layers = model.cfg.text.n_layers
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range: the language model has {n_layers} layers")
    if release is not None and (release.d_model, release.n_layers) != (model.cfg.text.d_model, n_layers):
        fits = [r.repo for r in qwen_scope_releases(model)]
        raise ValueError(
            f"{release.repo} was trained on {release.base_model} (d_model {release.d_model}, {release.n_layers} layers); "
            f"this model's language model has d_model {model.cfg.text.d_model} and {n_layers} layers. Releases that fit: {fits or 'none'}"
        )
