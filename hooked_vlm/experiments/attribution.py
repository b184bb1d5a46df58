"""Integrated Gradients over image tokens at the language model's input (PAPER_PROTOCOL §1.4,
strategy 3: "top-k tokens by attribution, with respect to the correct class logit or the
box-coordinate tokens").

The paper gives neither the target, the baseline nor the number of steps (§1.11.6). Choices:

- **Target metric** `f`: the mean teacher-forced log-probability of the ground-truth answer's
  scored tokens (`-metrics.masked_nll`). Localization: the GT box in the model's own format
  (`prompts.localization_answer`), digit tokens only (the coordinates, template masked out, as
  in §1.9). List classification: the class name as the whole answer, every answer token.
- **Input** `x`: the image tokens' `hook_inputs_embeds` (text tokens stay as they are).
- **Baseline** `x'`: one vector at every image token (default: the mean visual embedding, as in
  Neo et al.'s code).
- **Path integral**: `steps` midpoint-Riemann steps, `alpha = (k + 1/2) / steps`; one forward and
  backward of the language model per step (the vision tower runs once).

A token's attribution is `sum_d (x - x')_d * mean_alpha grad_d f(x' + alpha (x - x'))`; by
completeness the attributions of an image sum to about `f(x) - f(x')`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vlm.boxes import Frame
from hooked_vlm.data.prompts import localization_answer
from hooked_vlm.experiments.data import Sample
from hooked_vlm.experiments.evaluate import box_format, task_prompt
from hooked_vlm.inputs import VLMInput
from hooked_vlm.metrics import masked_nll

Rank = Literal["signed", "abs"]


@dataclass
class Attributions:
    """IG result for a batch: `scores` per image token in layout order (`inputs.layout` rows),
    `f_input` / `f_baseline` the metric at `x` and at `x'` per batch row."""

    inputs: VLMInput
    scores: Float[Tensor, "image_token"]
    f_input: Float[Tensor, "batch"]
    f_baseline: Float[Tensor, "batch"]

    def of_image(self, image: int) -> Float[Tensor, "k"]:
        """One image's token attributions, in sequence order (views in order, row-major)."""
        return self.scores[self.inputs.layout.image == image]


def teacher_forced_inputs(
    model, samples: list[Sample], task: str, frame: Frame | None = None
) -> tuple[VLMInput, str | None]:
    """The task prompts with the ground-truth answers appended, and the token filter to score."""
    if task == "localization":
        answers = [_box_answer(s, box_format(model, frame)) for s in samples]
        token_filter = "digits"
    elif task == "list":
        answers, token_filter = [s.class_name for s in samples], None
    else:
        raise ValueError(f"no attribution target for task {task!r}; expected 'localization' or 'list'")
    prompts = [task_prompt(task, s) for s in samples]
    return model.prepare([s.image for s in samples], prompts, answers=answers), token_filter


def _box_answer(sample: Sample, boxes: dict) -> str:
    try:
        return localization_answer(sample.box, sample.image_size, sample.class_name, **boxes)
    except ValueError as error:  # e.g. an object outside LLaVA's centre crop: the model never sees it
        raise ValueError(f"sample {sample.id}: no ground-truth answer to attribute ({error})") from error


def integrated_gradients(
    model,
    inputs: VLMInput,
    baseline: Float[Tensor, "d_model"],
    *,
    steps: int = 50,
    token_filter: str | None = None,
) -> Attributions:
    """IG of the answer's mean log-probability with respect to every image token's
    `hook_inputs_embeds` (see the module docstring). `inputs` must carry answers."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if baseline.shape != (model.cfg.text.d_model,):
        raise ValueError(f"the IG baseline must be a [{model.cfg.text.d_model}] vector, got {tuple(baseline.shape)}")
    layout = inputs.layout
    rows, cols = layout.batch.to(model.device), layout.position.to(model.device)
    with torch.no_grad():
        x = model.embed_inputs(inputs.input_ids, model.encode_images(inputs.pixel_values), inputs.image_token_mask())
    image = x[rows, cols]  # [image_token, d_model]
    start = baseline.to(x).expand_as(image)

    def metric(image_embeds: Tensor) -> Float[Tensor, "batch"]:
        embeds = x.index_put((rows, cols), image_embeds)
        logits = model.run_language_model(embeds, inputs.attention_mask, inputs.position_ids)
        return -masked_nll(model, inputs, token_filter=token_filter, logits=logits)

    total = torch.zeros_like(image, dtype=torch.float32)
    for k in range(steps):
        point = (start + (k + 0.5) / steps * (image - start)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(metric(point).sum(), point)
        total += grad.float()
    scores = ((image - start).float() * total / steps).sum(-1)
    with torch.no_grad():
        f_input, f_baseline = metric(image), metric(start)
    return Attributions(inputs, scores.cpu(), f_input.float().cpu(), f_baseline.float().cpu())


def top_attributed(
    inputs: VLMInput, per_image: list[Float[Tensor, "k"]], fraction: float, *, views: str = "all", rank: Rank = "signed"
) -> list[Int[Tensor, "top_k"]]:
    """Per image, the positions (in `inputs`) of the `round(fraction * n)` tokens of the chosen
    views with the highest attribution (`rank="signed"`: most in favour of the answer; "abs":
    largest magnitude). `per_image[i]` holds image i's attributions in layout order."""
    if rank not in ("signed", "abs"):
        raise ValueError(f"unknown IG ranking {rank!r}; expected 'signed' or 'abs'")
    layout, chosen = inputs.layout, []
    for image, scores in enumerate(per_image):
        every, wanted = layout.positions(image, "all"), layout.positions(image, views)
        if len(scores) != len(every):
            raise ValueError(f"image {image}: {len(scores)} attributions for {len(every)} image tokens")
        keep = torch.isin(every, wanted)
        values = scores[keep].abs() if rank == "abs" else scores[keep]
        order = torch.sort(values, descending=True, stable=True).indices
        chosen.append(every[keep][order[: round(fraction * int(keep.sum()))]])
    return chosen
