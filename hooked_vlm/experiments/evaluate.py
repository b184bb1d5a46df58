"""`evaluate`: the paper's three tasks on a dataset, optionally under an intervention.

Every other experiment is `evaluate` with an intervention built per batch from the batch's own
image-token map (object tokens, random tokens, knocked-out edges, ablated heads ...).

Output columns (one row per query):
- all tasks: `sample_id`, `class_name`, `task`, `condition`, `prompt`, `response`, `finished`
  (the answer ended before `max_new_tokens`: False means it was cut), `area` (object pixels),
  `size_class` (COCO's "small" / "medium" / "large"), `excluded` (None, or why the sample was
  not asked: an object wholly outside what the model sees, e.g. in the side strips LLaVA's
  centre crop cuts off; its answer columns are empty and `summarize` leaves it out)
- localization: `image_width`, `image_height`, `gt_box`, `pred_box` (None if unparsable),
  `n_boxes`, `iou` (NaN if unparsable), `hit@0.5`, `hit@0.7`, `hit@0.9`, `loc_score`
  (the paper's score: the mean of the three hits); InternVL also `float_box` (the box was written
  as [0, 1] floats, read per `float_boxes`; `summarize` counts them in `n_float_boxes`)
- list: `correct` (the class name appears in the response)
- binary: `image` ("original" or "removed"), `present`, `answer` (True/False/None), `correct`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import pandas as pd
import torch

from hooked_vlm.boxes import FloatBoxes, Frame, check_float_boxes, format_box
from hooked_vlm.data.prompts import binary_prompt, list_prompt, localization_prompt
from hooked_vlm.experiments.data import Sample, SampleMode, sample_sources, size_class
from hooked_vlm.experiments.summary import summarize
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Item, Run, Work, execute
from hooked_vlm.scoring import MATCHES, Match, binary_answer, classification_correct, score_localization_answer

Task = Literal["localization", "list", "binary"]
TASKS: tuple[Task, ...] = ("localization", "list", "binary")
# a list answer is ~3 tokens per class and a box sentence ~10 + 28 tokens: shorter caps cut
# answers, and more often under ablation (PROTOCOL-AUDIT A7); `finished` records every cut
MAX_NEW_TOKENS = {"localization": 64, "list": 128, "binary": 4}
# intervention(model, inputs, samples) -> forward hooks for this batch (active on every generated token)
Intervention = Callable[[Any, VLMInput, list[Sample]], list]


def default_frame(model) -> Frame:
    """The frame the model's boxes refer to: InternVL the original image; LLaVA the square it
    saw — the padded square in "pad" mode, the centre crop in "crop" mode."""
    if model.cfg.family == "internvl":
        return "original"
    return "padded" if model.preprocessing.image_mode == "pad" else "crop"


def box_format(model, frame: Frame | None = None, float_boxes: FloatBoxes = "official") -> dict[str, Any]:
    """How `model` writes boxes, as keyword arguments of `parse_boxes`, `format_box`,
    `score_localization_answer` and `localization_answer`: its family, `frame` (None: the
    `default_frame`), for LLaVA its image side (the "crop" window depends on it; it is not
    always LLaVA-1.5's 336 px), for InternVL how a box written as [0, 1] floats is read
    (`float_boxes`: "official", InternVL's evaluator, or "thousandths"; `boxes.parse_boxes`)."""
    check_float_boxes(model.cfg.family, float_boxes)
    kwargs: dict[str, Any] = {"family": model.cfg.family, "frame": frame or default_frame(model)}
    if model.cfg.family == "llava":
        kwargs["crop_size"] = model.preprocessing.image_size
    else:
        kwargs["float_boxes"] = float_boxes
    return kwargs


def task_prompt(task: Task, sample: Sample) -> str:
    if task == "localization":
        return localization_prompt(sample.class_name)
    if task == "list":
        if not sample.choices:
            raise ValueError(f"sample {sample.id} has no list choices for the list-classification prompt")
        return list_prompt(sample.choices)
    if task == "binary":
        return binary_prompt(sample.class_name)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def evaluate(
    model,
    dataset: Any,
    task: Task = "localization",
    *,
    intervention: Intervention | None = None,
    condition: str = "baseline",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    frame: Frame | None = None,
    match: Match = "word",
    float_boxes: FloatBoxes = "official",
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Greedy answers of `model` on every sample of `dataset` for `task`, scored (see the module
    docstring for the columns). `intervention` adds hooks built from each batch's inputs. An empty
    dataset raises ValueError. `limit`, `sample`, `sample_seed`: which samples (`sample_sources`:
    a seeded random subset of `limit` by default). `match`: the list task's rule, "word" (whole
    words, plurals) or "substring" (the paper's literal test, `classification_correct`).
    `float_boxes`: how an InternVL box written as [0, 1] floats is read, "official" (as
    fractions, InternVL's evaluator) or "thousandths" (`boxes.parse_boxes`). `run`: a
    run directory to record the rows in and resume from (`hooked_vlm.runs`; one item per sample,
    its one or two queries)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    boxes = box_format(model, frame, float_boxes)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[task]
    chosen = sample_sources(dataset, limit, sample=sample, sample_seed=sample_seed)
    items = [Item(sample_id, sample_id, load) for sample_id, load in chosen]

    def ask(batch: list[tuple]) -> Iterator[tuple[str, list[dict]]]:
        images = [image for _, _, image, _, _ in batch]
        prompts = [task_prompt(task, sample) for _, sample, _, _, _ in batch]
        inputs = model.prepare(images, prompts)
        hooks = intervention(model, inputs, [s for _, s, _, _, _ in batch]) if intervention else []
        tokens = model.generate(inputs, max_new_tokens=max_new_tokens, fwd_hooks=hooks, return_tokens=True)
        finished = torch.isin(tokens, torch.tensor(model.cfg.eos_token_ids, device=tokens.device)).any(-1).tolist()
        responses = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for (key, sample, _, kind, last), prompt, response, done in zip(batch, prompts, responses, finished):
            answered_columns = {"finished": done, **_object_columns(sample), "excluded": None, "condition": condition}
            row = _score(task, sample, kind, prompt, response, boxes, match) | answered_columns
            answered.setdefault(key, []).append(row)
            if last:
                yield key, answered.pop(key)

    answered: dict[str, list[dict]] = {}

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        batch: list[tuple] = []
        for item in pending:  # binary: a sample's two queries
            sample = item.payload()
            reason = exclusion(sample, boxes)
            asked = list(queries([sample], task))
            if reason:  # recorded, never a crash in the middle of a long run
                yield item.key, [excluded_row(task, sample, kind, reason) | {"condition": condition} for _, _, kind in asked]
                continue
            for index, (_, image, kind) in enumerate(asked):
                batch.append((item.key, sample, image, kind, index == len(asked) - 1))
                if len(batch) == batch_size:
                    yield from ask(batch)
                    batch = []
        if batch:
            yield from ask(batch)

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = {"task": task, "condition": condition, "intervention": intervention, "max_new_tokens": max_new_tokens,
                "box_format": boxes, "match": match, "limit": limit, "sample": sample, "sample_seed": sample_seed,
                "data": chosen.data}  # fmt: skip
    work = Work("evaluate", items, compute, settings=settings, model=model, desc=f"{task} [{condition}]", unit="sample")
    return execute(work, run, progress=progress)


def exclusion(sample: Sample, boxes: dict[str, Any]) -> str | None:
    """Why `sample` cannot be asked about, or None: its object lies wholly outside what the model
    sees (LLaVA's centre crop cuts off side strips; the ground-truth box has no answer in the
    model's frame, and the object no token)."""
    try:
        format_box(sample.box, sample.image_size, **boxes)
    except ValueError:
        return f"object outside the model's view (box {tuple(sample.box)} is outside the {boxes['frame']!r} frame)"
    return None


def excluded_row(task: Task, sample: Sample, kind: str, reason: str) -> dict:
    """The row of a query not asked (see `exclusion`): its labels, no answer."""
    row = {"sample_id": sample.id, "class_name": sample.class_name, "task": task, "prompt": None, "response": None,
           "finished": None, **_object_columns(sample), "excluded": reason}  # fmt: skip
    return row | ({"image": kind, "present": kind == "original"} if task == "binary" else {})


def queries(samples: Iterable[Sample], task: Task):
    """(sample, image, kind): binary classification also asks about the object-removed image."""
    for sample in samples:
        yield sample, sample.image, "original"
        if task == "binary" and sample.removed_image is not None:
            yield sample, sample.removed_image, "removed"


def _object_columns(sample: Sample) -> dict:
    area = sample.object_area
    return {"area": area, "size_class": size_class(area)}


def _score(task: Task, sample: Sample, kind: str, prompt: str, response: str, boxes: dict[str, Any], match: Match) -> dict:
    row = {"sample_id": sample.id, "class_name": sample.class_name, "task": task, "prompt": prompt, "response": response}
    if task == "localization":
        width, height = sample.image_size
        scored = score_localization_answer(response, sample.box, sample.image_size, **boxes)
        return row | {"image_width": width, "image_height": height, "gt_box": tuple(sample.box)} | scored
    if task == "list":
        return row | {"correct": classification_correct(response, sample.class_name, match=match)}
    answer = binary_answer(response)
    present = kind == "original"
    return row | {"image": kind, "present": present, "answer": answer, "correct": answer is not None and answer == present}
