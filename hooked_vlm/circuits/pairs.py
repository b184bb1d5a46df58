"""`CircuitPair`: a clean input, its corrupted twin, and the metric that scores a run of it.

The two inputs must put the same tokens at the same positions (same token ids shape, attention
mask, image layout and pixel shape): an edge's contribution at a position is compared between
them. The metric has the signature of `hooked_vlm.patching` metrics: `(logits[:, offset:],
offset) -> [batch]` (e.g. `patching.answer_nll_metric(clean)`: the teacher-forced NLL of the
answer, as `head_mediation` scores it). `spans` optionally splits the positions into named spans
(`hooked_vlm.circuits.spans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from hooked_vlm.inputs import VLMInput

Metric = Callable[[Tensor, int], Tensor]


@dataclass
class CircuitPair:
    clean: VLMInput
    corrupted: VLMInput
    metric: Metric
    spans: Any = None  # hooked_vlm.circuits.spans.Spans
    id: str = ""

    def __post_init__(self) -> None:
        check_pair(self.clean, self.corrupted)
        if not callable(self.metric):
            raise TypeError(f"metric must be callable (logits, offset) -> [batch], got {type(self.metric).__name__}")
        if self.spans is not None:
            self.spans.check(self.clean)

    def __len__(self) -> int:
        return len(self.clean)


def check_pair(clean: VLMInput, corrupted: VLMInput) -> None:
    """A clear error unless the two inputs have one token layout."""
    problems = []
    if clean.input_ids.shape != corrupted.input_ids.shape:
        problems.append(f"token ids {tuple(clean.input_ids.shape)} vs {tuple(corrupted.input_ids.shape)}")
    elif not torch.equal(clean.attention_mask.cpu(), corrupted.attention_mask.cpu()):
        problems.append("attention masks (padding) differ")
    if clean.pixel_values.shape != corrupted.pixel_values.shape:
        problems.append(f"pixel values {tuple(clean.pixel_values.shape)} vs {tuple(corrupted.pixel_values.shape)}")
    if not clean.layout.same_geometry(corrupted.layout):
        problems.append("image-token layouts differ (other image sizes, tiles or positions)")
    if problems:
        raise ValueError("clean and corrupted inputs of a circuit pair must share one token layout: " + "; ".join(problems))


def as_pairs(pairs: CircuitPair | Sequence[CircuitPair], model=None) -> list[CircuitPair]:
    """A non-empty list of pairs with the same span names (their vision spans checked against
    `model`'s vision tower when given)."""
    pairs = [pairs] if isinstance(pairs, CircuitPair) else list(pairs)
    if not pairs:
        raise ValueError("no circuit pairs given")
    for pair in pairs:
        if not isinstance(pair, CircuitPair):
            raise TypeError(f"expected CircuitPair items, got {type(pair).__name__}")
    names = {None if pair.spans is None else tuple(pair.spans.names) for pair in pairs}
    if len(names) > 1:
        raise ValueError(f"every pair must have the same spans (or none); got {sorted(map(str, names))}")
    if model is not None:
        for pair in pairs:
            if pair.spans is not None:
                pair.spans.check_model(model)
    return pairs


def span_names(pairs: list[CircuitPair]) -> tuple[str, ...] | None:
    return None if pairs[0].spans is None else tuple(pairs[0].spans.names)


def metric_values(metric: Metric, logits: Tensor) -> Tensor:
    """The metric of full-sequence logits, as `[batch]` (NaN is an error: it would poison every score)."""
    values = metric(logits, 0)
    if not isinstance(values, Tensor) or values.dim() != 1 or len(values) != len(logits):
        raise ValueError(f"the metric must return one value per batch row ([{len(logits)}]), got "
                         f"{getattr(values, 'shape', type(values).__name__)}")  # fmt: skip
    if values.isnan().any():
        raise ValueError("the metric returned NaN")
    return values


def kl_metric(clean_logits: Tensor, positions: Tensor) -> Metric:
    """KL(p_clean ‖ p) of the next-token distributions at `positions` (`[batch, pos]` bool, e.g.
    the positions that predict the answer), summed over them: 0 at the clean run, its minimum.
    Marked as a divergence: EAP, a gradient at the clean run, cannot score it (use EAP-IG)."""
    reference = torch.log_softmax(clean_logits.detach().to(torch.promote_types(clean_logits.dtype, torch.float32)), dim=-1)
    positions = positions.bool()

    def metric(logits: Tensor, offset: int) -> Tensor:
        logp = torch.log_softmax(logits.to(reference.dtype), dim=-1)
        ref, where = reference[:, offset:].to(logp.device), positions[:, offset:].to(logp.device)
        kl = (ref.exp() * (ref - logp)).sum(-1)
        return torch.where(where, kl, 0.0).sum(-1)

    metric.divergence = True
    metric.__name__ = "kl_metric"
    return metric


def object_removed_pairs(
    model,
    dataset: Any,
    *,
    task: str = "localization",
    target: str = "src_greedy",
    composite: bool = True,
    composite_px: int = 4,
    spans: bool = True,
    dilation: int = 0,
    limit: int | None = None,
    max_new_tokens: int = 40,
    frame: Any = None,
) -> list[CircuitPair]:
    """Clean = the image with the object, corrupted = its object-removed twin, both prompted and
    teacher-forced with the same answer, scored by the masked NLL of the answer's decisive tokens
    — the pairs, targets and metric of `experiments.head_mediation` (localization: the box's
    digits; binary: the first answer token).

    `dataset`: anything `experiments.as_samples` reads whose samples carry `removed_image`.
    `composite`: the corrupted image is the original outside the object's mask grown by
    `composite_px` pixels and the removed twin inside, so only the object's pixels differ (an
    inpainted, re-encoded image otherwise differs slightly everywhere). `spans`: attach
    `Spans.from_layout` of the object's mask (`dilation` token rings)."""
    import itertools

    from hooked_vlm.experiments.data import as_samples, empty_dataset_error

    samples = list(itertools.islice(as_samples(dataset), limit))
    if not samples:
        raise empty_dataset_error()
    return [object_removed_pair(model, sample, task=task, target=target, composite=composite, composite_px=composite_px,
                                spans=spans, dilation=dilation, max_new_tokens=max_new_tokens, frame=frame)
            for sample in samples]  # fmt: skip


def object_removed_pair(
    model, sample, *, task: str = "localization", target: str = "src_greedy", composite: bool = True, composite_px: int = 4,
    spans: bool = True, dilation: int = 0, max_new_tokens: int = 40, frame: Any = None,
) -> CircuitPair:
    """The pair of one sample (an `experiments.Sample` with `removed_image`): see `object_removed_pairs`."""
    from hooked_vlm.experiments.evaluate import box_format
    from hooked_vlm.experiments.head_mediation import _scored_mask, _target_answer, pair_prompt
    from hooked_vlm.circuits.spans import Spans
    from hooked_vlm.patching import answer_nll_metric

    if task not in ("localization", "binary"):
        raise ValueError(f"object-removed pairs support task 'localization' or 'binary', got {task!r}")
    prompt = pair_prompt(sample, task)
    answer, _ = _target_answer(model, sample, task, prompt, target, max_new_tokens, box_format(model, frame))
    removed = composite_removed(sample.image, sample.removed_image, sample.mask, composite_px) if composite else sample.removed_image
    clean = model.prepare(sample.image, prompt, answers=answer)
    corrupted = model.prepare(removed, prompt, answers=answer)
    metric = answer_nll_metric(clean, token_mask=_scored_mask(model, clean, task))
    span_map = Spans.from_layout(model, clean, mask=sample.mask, dilation=dilation) if spans else None
    return CircuitPair(clean, corrupted, metric, span_map, id=sample.id)


def composite_removed(original, removed, mask, grow_px: int = 4):
    """The removed twin inside the object's mask grown by `grow_px` pixels, the original outside."""
    import numpy as np
    from PIL import Image, ImageFilter

    region = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    if grow_px > 0:
        region = region.filter(ImageFilter.MaxFilter(2 * grow_px + 1))
    return Image.composite(removed.convert("RGB"), original.convert("RGB"), region)
