"""Integrated Gradients over image tokens at the language model's input (PAPER_PROTOCOL §1.4,
strategy 3: "top-k tokens by attribution, with respect to the correct class logit or the
box-coordinate tokens").

The paper gives neither the target, the baseline nor the number of steps (§1.11.6). Choices:

- **Target metric** `f` (`target="answer"`, the default): the mean teacher-forced
  log-probability of the ground-truth answer's scored tokens (`-metrics.masked_nll`).
  Localization: the GT box in the model's own format (`prompts.localization_answer`), digit
  tokens only (the coordinates, template masked out, as in §1.9). List classification: the class
  name as the whole answer, its own tokens only — not the end-of-turn token the chat template
  appends (p(end | class) asks whether *other* objects follow; PROTOCOL-AUDIT A2).
  `target="first_logit"` (list only) is the paper's words to the letter, "the correct class
  logit": the raw logit of the class name's first token at the answer position.
- **Input** `x`: the image tokens' `hook_inputs_embeds` (text tokens stay as they are).
- **Baseline** `x'`: one vector at every image token (default: the mean visual embedding, as in
  Neo et al.'s code).
- **Path integral**: `steps` midpoint-Riemann steps, `alpha = (k + 1/2) / steps`; one forward and
  backward of the language model per step (the vision tower runs once).

A token's attribution reduces `a_d = (x - x')_d * mean_alpha grad_d f(x' + alpha (x - x'))` over
d_model: `reduce="l1"` (default) is `sum_d |a_d|`, as Neo et al.'s code ranks tokens
(`integrated_grads.abs().sum(dim=-1)`, PROTOCOL-AUDIT A3); `reduce="sum"` is the signed
`sum_d a_d`, whose sum over an image is about `f(x) - f(x')` (completeness).
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
Reduce = Literal["l1", "sum"]
Target = Literal["answer", "first_logit"]
REDUCTIONS, TARGETS = ("l1", "sum"), ("answer", "first_logit")


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
        answers, token_filter = [s.class_name for s in samples], "answer_text"
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
    reduce: Reduce = "l1",
    target: Target = "answer",
) -> Attributions:
    """IG of the answer's mean log-probability (or, `target="first_logit"`, of its first token's
    logit) with respect to every image token's `hook_inputs_embeds`, reduced over d_model by
    `reduce` (see the module docstring). `inputs` must carry answers."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown IG reduction {reduce!r}; expected one of {REDUCTIONS}")
    if target not in TARGETS:
        raise ValueError(f"unknown IG target {target!r}; expected one of {TARGETS}")
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
        if target == "first_logit":
            return first_answer_logit(inputs, logits)
        return -masked_nll(model, inputs, token_filter=token_filter, logits=logits)

    total = torch.zeros_like(image, dtype=torch.float32)
    for k in range(steps):
        point = (start + (k + 0.5) / steps * (image - start)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(metric(point).sum(), point)
        total += grad.float()
    per_dim = (image - start).float() * total / steps
    scores = per_dim.abs().sum(-1) if reduce == "l1" else per_dim.sum(-1)
    with torch.no_grad():
        f_input, f_baseline = metric(image), metric(start)
    return Attributions(inputs, scores.cpu(), f_input.float().cpu(), f_baseline.float().cpu())


def first_answer_logit(inputs: VLMInput, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch"]:
    """Each row's logit of its answer's first token, at the position that predicts it."""
    if inputs.answer_mask is None:
        raise ValueError("these inputs carry no answer: prepare them with answers=...")
    first = inputs.answer_mask.int().argmax(-1).to(logits.device)  # the first answer position of each row
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, first - 1, inputs.input_ids.to(logits.device)[rows, first]].float()


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
