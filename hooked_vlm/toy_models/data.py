"""Training batches: synthetic examples encoded exactly as `HookedVLM.prepare` encodes them.

The prompt goes through the family's own template and tokenisation functions
(`hooked_vlm.families.{llava,internvl}`: `render_prompt`, `tokenize`), the answer is appended as
`prepare(..., answers=...)` does (`answer_token_ids`: LLaVA ` {answer}</s>`, InternVL
`{answer}<|im_end|>`), and pixels come from the checkpoint's own HF image processor (LLaVA:
`LlavaImageProcessorPil(do_pad=True)`, InternVL: `GotOcr2ImageProcessorPil` with
`crop_to_patches=True`). So a model sees at inference the very inputs it was trained on.
Only the answer tokens carry a loss (labels are -100 elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor
from transformers import ProcessorMixin

from hooked_vlm.data import prompts
from hooked_vlm.data.synthetic import SyntheticItem, TaskExample, absent_in_target_colour
from hooked_vlm.families import internvl as internvl_family
from hooked_vlm.families import llava as llava_family
from hooked_vlm.families.common import answer_token_ids

IGNORE_INDEX = -100
TASKS = ("localization", "list", "binary")


@dataclass
class Encoded:
    """One example: token ids, labels (-100 outside the answer), and its image's views."""

    task: str
    object_removed: bool
    input_ids: list[int]
    labels: list[int]
    pixel_values: Float[Tensor, "view channel height width"]


@dataclass
class Batch:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "view channel height width"]
    tasks: list[str]
    object_removed: list[bool]  # per row: the image is the item's removed twin

    def model_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}


class ToyEncoder:
    """Turns (image, prompt[, answer]) into token ids and pixels for one family's checkpoint."""

    def __init__(self, family: str, processor: ProcessorMixin, image_token_id: int, max_tiles: int = 4):
        self.family = family
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = image_token_id
        self.max_tiles = max_tiles
        if family == "llava":
            self.tokens_per_view = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
        else:
            self.tokens_per_view = processor.image_seq_length

    def pixels(self, image: Image.Image) -> Float[Tensor, "view channel height width"]:
        """The HF image processor's output for one image (LLaVA: one view; InternVL: tiles +
        thumbnail)."""
        if self.family == "llava":
            out = self.image_processor([image], return_tensors="pt")
        else:
            out = self.image_processor(
                [image], crop_to_patches=True, min_patches=1, max_patches=self.max_tiles, return_tensors="pt"
            )
        return torch.as_tensor(out["pixel_values"])

    def prompt_ids(self, prompt: str, n_views: int) -> tuple[str, list[int]]:
        """(rendered text, token ids) of the templated prompt, as `HookedVLM.prepare` makes them."""
        n_tokens = self.tokens_per_view * n_views
        if self.family == "llava":
            text = llava_family.render_prompt(prompt, "hf")
            return text, llava_family.tokenize(self.tokenizer, text, n_tokens, self.image_token_id, "hf")
        text = internvl_family.render_prompt(prompt, "hf")
        return text, internvl_family.tokenize(self.tokenizer, text, n_tokens, self.image_token_id)

    def answer_ids(self, text: str, answer: str) -> list[int]:
        """The answer and the end-of-turn token, tokenised in context (as `prepare(answers=...)`)."""
        if self.family == "llava":
            return answer_token_ids(self.tokenizer, text, answer, " ", self.tokenizer.eos_token)
        return answer_token_ids(self.tokenizer, text, answer, "", self.tokenizer.eos_token)

    def encode(self, example: TaskExample) -> Encoded:
        pixel_values = self.pixels(example.image)
        text, prompt = self.prompt_ids(example.prompt, len(pixel_values))
        answer = self.answer_ids(text, example.answer)
        return Encoded(example.task, example.object_removed, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, pixel_values)


def collate(examples: Sequence[Encoded], pad_id: int) -> Batch:
    """Right padding: each row's positions then start at 0, as at inference without padding
    (left-padded inference shifts positions by the attention mask, which is equivalent)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    pixels = torch.cat([e.pixel_values for e in examples])
    return Batch(ids, mask, labels, pixels, [e.task for e in examples], [e.object_removed for e in examples])


def pick_example(
    item: SyntheticItem,
    family: str,
    rng: np.random.Generator,
    task_weights: Sequence[float],
    shape_negatives: float = 0.0,
    shapes: Sequence[str] = (),
) -> TaskExample:
    """One supervised example of `item`: localization, list (original or removed twin, 2:1) or
    binary (Yes on the original, or one of the two No cases, 2:1:1).

    `shape_negatives`: the probability that a binary No instead asks for the target's colour in
    another of `shapes` absent from the image ("is there a green circle?" beside a green square),
    the one negative that colour alone cannot answer. The item's own hard negative is that case
    only when its draw lands on it (1 in 6 for the toys' two shapes and six colours)."""
    examples = item.examples(family)  # loc, list, list-removed, yes, no-removed[, no-absent]
    task = rng.choice(len(TASKS), p=np.asarray(task_weights) / np.sum(task_weights))
    if task == 0:
        return examples[0]
    if task == 1:
        return examples[1] if rng.random() < 2 / 3 else examples[2]
    if rng.random() < 0.5:
        return examples[3]
    if shape_negatives and rng.random() < shape_negatives:
        others = absent_in_target_colour(item, shapes)
        if others:
            absent = others[int(rng.integers(len(others)))]
            return TaskExample("binary", item.image, prompts.binary_prompt(absent), prompts.NO, object_removed=False)
    return examples[int(rng.choice(range(4, len(examples))))]


def training_batch(
    encoder: ToyEncoder,
    items: Sequence[SyntheticItem],
    rng: np.random.Generator,
    task_weights: Sequence[float],
    shape_negatives: float = 0.0,
    shapes: Sequence[str] = (),
) -> Batch:
    if shape_negatives and not shapes:
        raise ValueError("shape_negatives needs the dataset's shapes")
    examples = [pick_example(item, encoder.family, rng, task_weights, shape_negatives, shapes) for item in items]
    pad_id = encoder.tokenizer.pad_token_id
    return collate([encoder.encode(e) for e in examples], pad_id)


def answer_loss(logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]) -> Tensor:
    """Next-token cross-entropy over answer tokens: the mean over each example's answer, then
    over examples. Averaging per example first matters: a box answer has ~25 tokens (most of
    them predictable punctuation) and a yes/no answer 2, so a plain token mean would give the
    yes/no examples, whose only signal is whether the model bound colour and shape, a tenth of
    the weight of a box."""
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return (losses.sum(dim=1) / counts.clamp(min=1))[counts > 0].mean()
