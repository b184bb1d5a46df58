"""Mean activations of image tokens over a dataset, the paper's ablation value (§1.4, §1.11.5:
one vector per model, averaged over every image token of ImageNet-val after the projector; for
InternVL over tiles and thumbnail alike), saved with its provenance (the model's identity, the
images read: count, source and a digest of their keys, the dtype and preprocessing), so that
loading it onto another model is an error naming both.

    images = ImageFolder("imagenet/val")        # hooked_vlm.data.collections; or a datasets dataset
    save_mean(compute_mean_embedding(model, images), "imagenet_mean.pt")
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.data.collections import ImagesUsed, known_length
from hooked_vlm.inputs import Views
from hooked_vlm.provenance import (
    Preprocessing,
    check_same_model,
    code_version,
    model_fingerprint,
    model_identity,
    preprocessing_settings,
    with_preprocessing,
)
from hooked_vlm.runs.files import write_file_atomically

FORMAT_VERSION = 2  # 2: with `provenance`; files of version 1 still load


@dataclass
class MeanEmbedding:
    """A mean activation: `vector` has the hook's per-token shape (`[d_model]` at
    `hook_inputs_embeds`). `count` image tokens were averaged; `fingerprint`/`model` identify
    the model's architecture (see `model_fingerprint`); `provenance` records the model's
    identity, the images, the dtype and the preprocessing (`compute_mean_embedding`)."""

    vector: Float[Tensor, "..."]
    hook: str
    count: int
    views: str
    fingerprint: str
    model: str
    provenance: dict = field(default_factory=dict)


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
        dense_in_moe = text.num_experts is not None and not text.is_moe_layer(int(hook.split(".")[1]))
        return (text.d_mlp_dense if dense_in_moe else text.d_mlp,)  # d_mlp is the experts' width
    if hook.endswith(("mlp.hook_router_logits", "mlp.hook_router_weights")):
        return (text.num_experts,)
    if hook.endswith("mlp.hook_expert_out"):
        return (text.num_experts, text.d_model)
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
    preprocessing: Preprocessing = None,
    progress: bool = True,
) -> MeanEmbedding:
    """Average `hook`'s activation over every image token (of the chosen views) of `images`: an
    image collection (`hooked_vlm.data.collections`: a folder, a `datasets` dataset), PIL
    images, or a dataset of samples, read one batch at a time. `preprocessing` overrides
    `model.preprocessing` meanwhile (e.g. {"image_mode": "pad"}).

    Each batch runs only up to the hook (the rest of the forward is skipped); sums are kept in
    float64. The prompt matters only for hooks after the first attention layer, and there only
    through the text *before* the image (attention is causal).
    """
    from hooked_vlm.interventions.ablation import check_position_hook

    check_position_hook(model, hook)
    used = ImagesUsed(images)
    with with_preprocessing(model, preprocessing) as settings:
        total, count = _sum_tokens(model, used, hook, views, prompt, batch_size, progress)
    if count == 0:
        raise ValueError(f"no image tokens in views {views!r} of the given images")
    fingerprint, description = model_fingerprint(model)
    provenance = {"model": model_identity(model), "images": used.provenance(), "dtype": str(model.dtype).removeprefix("torch."),
                  "preprocessing": settings, "prompt": prompt, "hooked_vlm": code_version(),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    return MeanEmbedding((total / count).to(model.dtype).cpu(), hook, count, str(views), fingerprint, description, provenance)


def _sum_tokens(model, images: ImagesUsed, hook: str, views: Views, prompt: str, batch_size: int, progress: bool):
    """(float64 sum, count) of `hook`'s activations over the image tokens of `images`."""
    total: Tensor | None = None
    count = 0
    n_images = known_length(images.images)
    n_batches = None if n_images is None else -(-n_images // batch_size)
    for batch in tqdm(_batched(images, batch_size), desc=f"mean of {hook}", unit="batch", disable=not progress, total=n_batches):
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
    return total, count


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


def save_mean(mean: MeanEmbedding, path: str | Path) -> Path:
    """Write the vector and its metadata (hook, count, views, model fingerprint, provenance) to
    one file, atomically (a crash never leaves a truncated file)."""
    path = Path(path)
    payload = asdict(mean) | {"vector": mean.vector.detach().cpu(), "format_version": FORMAT_VERSION}
    write_file_atomically(path, lambda f: torch.save(payload, f))
    return path


def load_mean(path: str | Path, model=None) -> MeanEmbedding:
    """Read a `save_mean` file. With `model`, refuse a vector of another width and a mean computed
    on another model (ValueError naming both; files without provenance, of format 1, only warn
    when the architecture differs)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path} is not a mean-embedding file of format {FORMAT_VERSION}")
    payload.pop("format_version")
    mean = MeanEmbedding(**payload)
    if model is not None:
        check_mean_fits(mean, model, mean.hook, where=f"the mean in {path}")
    return mean


def _warn_if_other_images(mean: MeanEmbedding, model, where: str) -> None:
    """Warn when the mean's images were prepared otherwise than this model's now (pad or crop, tile
    limit, sizes): its image tokens are other vectors. The template does not reach them."""
    recorded, now = mean.provenance.get("preprocessing") or {}, preprocessing_settings(model)
    differ = sorted(k for k in recorded.keys() & now.keys() if k != "template" and recorded[k] != now[k])
    if differ:
        warnings.warn(f"{where} was computed on images prepared with {', '.join(f'{k}={recorded[k]!r}' for k in differ)}; "
                      f"this model prepares them with {', '.join(f'{k}={now[k]!r}' for k in differ)}", stacklevel=4)  # fmt: skip


def check_mean_fits(mean: MeanEmbedding, model, hook: str, where: str = "the mean") -> None:
    """Refuse a mean of another shape than `hook`'s, or computed on another model (by its
    provenance; a mean without one only warns when the architecture differs)."""
    expected = hook_shape(model, hook)
    if expected is not None and tuple(mean.vector.shape) != expected:
        raise ValueError(
            f"the mean at {mean.hook} has shape {tuple(mean.vector.shape)} (computed on {mean.model}); "
            f"{hook} of this model carries {expected} per token"
        )
    if mean.hook != hook:
        warnings.warn(f"using a mean computed at {mean.hook} to ablate {hook}", stacklevel=3)
    if "model" in mean.provenance:
        check_same_model(mean.provenance["model"], model, where)
        _warn_if_other_images(mean, model, where)
        return
    fingerprint, description = model_fingerprint(model)
    if mean.fingerprint != fingerprint:
        warnings.warn(f"the mean was computed on another model ({mean.model}); this one is {description}", stacklevel=3)
