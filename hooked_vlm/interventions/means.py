"""Mean activations of image tokens over a dataset, the paper's ablation value (§1.4, §1.11.5:
one vector per model, averaged over every image token of ImageNet-val after the projector; for
InternVL over tiles and thumbnail alike), saved with enough metadata to refuse a wrong model."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.inputs import Views

FORMAT_VERSION = 1


@dataclass
class MeanEmbedding:
    """A mean activation: `vector` has the hook's per-token shape (`[d_model]` at
    `hook_inputs_embeds`). `count` image tokens were averaged; `fingerprint`/`model` identify
    the model it was computed on (see `model_fingerprint`)."""

    vector: Float[Tensor, "..."]
    hook: str
    count: int
    views: str
    fingerprint: str
    model: str


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


def hook_shape(model, hook: str) -> tuple[int, ...] | None:
    """The per-token shape of a language-model hook (None if not known from the name)."""
    text = model.cfg.text
    residual = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    if hook in ("hook_embed", "hook_inputs_embeds") or hook.endswith((*residual, "hook_normalized")) and "attn." not in hook:
        return (text.d_model,)
    if hook.endswith(("attn.hook_q", "attn.hook_rot_q", "attn.q_norm.hook_normalized", "attn.hook_z")):
        return (text.n_heads, text.d_head)
    if hook.endswith(("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.k_norm.hook_normalized")):
        return (text.n_key_value_heads, text.d_head)
    if hook.endswith("attn.hook_result"):
        return (text.n_heads, text.d_model)
    if hook.endswith(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")):
        return (text.d_mlp,)
    return None


class _Stop(Exception):
    """Raised by the capture hook: nothing after the hook is needed."""


@torch.no_grad()
def compute_mean_embedding(
    model,
    images: Iterable[Image.Image],
    *,
    hook: str = "hook_inputs_embeds",
    views: Views = "all",
    prompt: str = "Describe the image.",
    batch_size: int = 8,
    progress: bool = True,
) -> MeanEmbedding:
    """Average `hook`'s activation over every image token (of the chosen views) of `images`.

    Each batch runs only up to the hook (the rest of the forward is skipped); sums are kept in
    float64. The prompt matters only for hooks after the first attention layer, and there only
    through the text *before* the image (attention is causal).
    """
    from hooked_vlm.interventions.ablation import check_position_hook

    check_position_hook(model, hook)
    total: Tensor | None = None
    count = 0
    batches = _batched(images, batch_size)
    for batch in tqdm(batches, desc=f"mean of {hook}", disable=not progress, total=_n_batches(images, batch_size)):
        inputs = model.prepare(batch, [prompt] * len(batch))
        captured: dict[str, Tensor] = {}

        def capture(activation: Tensor, hook) -> None:
            captured["value"] = activation
            raise _Stop

        try:
            with model.hooks(fwd_hooks=[(hook, capture)]):
                model(inputs)
        except _Stop:
            pass
        layout = inputs.layout
        for image in range(layout.n_images):
            value = captured["value"]  # on its block's device under a device map
            rows = value[layout.image_batch_row[image], layout.positions(image, views).to(value.device)]
            total = rows.double().sum(0) if total is None else total + rows.double().sum(0)
            count += rows.shape[0]
    if count == 0:
        raise ValueError(f"no image tokens in views {views!r} of the given images")
    fingerprint, description = model_fingerprint(model)
    return MeanEmbedding((total / count).to(model.dtype).cpu(), hook, count, str(views), fingerprint, description)


def _batched(images: Iterable[Image.Image], size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _n_batches(images: Iterable, size: int) -> int | None:
    return -(-len(images) // size) if isinstance(images, Sequence) else None


def save_mean(mean: MeanEmbedding, path: str | Path) -> Path:
    """Write the vector and its metadata (hook, count, views, model fingerprint) to one file."""
    path = Path(path)
    payload = asdict(mean) | {"vector": mean.vector.detach().cpu(), "format_version": FORMAT_VERSION}
    torch.save(payload, path)
    return path


def load_mean(path: str | Path, model=None) -> MeanEmbedding:
    """Read a `save_mean` file. With `model`, refuse a vector of another width (ValueError) and
    warn when it was computed on a model of another architecture."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a mean-embedding file of format {FORMAT_VERSION}")
    payload.pop("format_version")
    mean = MeanEmbedding(**payload)
    if model is not None:
        check_mean_fits(mean, model, mean.hook)
    return mean


def check_mean_fits(mean: MeanEmbedding, model, hook: str) -> None:
    expected = hook_shape(model, hook)
    if expected is not None and tuple(mean.vector.shape) != expected:
        raise ValueError(
            f"the mean at {mean.hook} has shape {tuple(mean.vector.shape)} (computed on {mean.model}); "
            f"{hook} of this model carries {expected} per token"
        )
    if mean.hook != hook:
        warnings.warn(f"using a mean computed at {mean.hook} to ablate {hook}", stacklevel=3)
    fingerprint, description = model_fingerprint(model)
    if mean.fingerprint != fingerprint:
        warnings.warn(f"the mean was computed on another model ({mean.model}); this one is {description}", stacklevel=3)
