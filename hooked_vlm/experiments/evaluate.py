"""`evaluate`: the paper's three tasks on a dataset, optionally under an intervention.

Every other experiment is `evaluate` with an intervention built per batch from the batch's own
image-token map (object tokens, random tokens, knocked-out edges, ablated heads ...).

Output columns (one row per query):
- all tasks: `sample_id`, `class_name`, `task`, `condition`, `prompt`, `response`
- localization: `image_width`, `image_height`, `gt_box`, `pred_box` (None if unparsable),
  `n_boxes`, `iou` (NaN if unparsable), `hit@0.5`, `hit@0.7`, `hit@0.9`, `loc_score`
  (the paper's score: the mean of the three hits)
- list: `correct` (the class name appears in the response)
- binary: `image` ("original" or "removed"), `present`, `answer` (True/False/None), `correct`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import pandas as pd

from hooked_vlm.boxes import Frame
from hooked_vlm.data.prompts import binary_prompt, list_prompt, localization_prompt
from hooked_vlm.experiments.data import Sample, batched, sample_sources
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Item, Run, Work, execute
from hooked_vlm.scoring import binary_answer, classification_correct, score_localization_answer

Task = Literal["localization", "list", "binary"]
TASKS: tuple[Task, ...] = ("localization", "list", "binary")
MAX_NEW_TOKENS = {"localization": 40, "list": 48, "binary": 4}
# intervention(model, inputs, samples) -> forward hooks for this batch (active on every generated token)
Intervention = Callable[[Any, VLMInput, list[Sample]], list]


def default_frame(model) -> Frame:
    """The frame the model's boxes refer to: InternVL the original image; LLaVA the square it
    saw — the padded square in "pad" mode, the centre crop in "crop" mode."""
    if model.cfg.family == "internvl":
        return "original"
    return "padded" if model.preprocessing.image_mode == "pad" else "crop"


def box_format(model, frame: Frame | None = None) -> dict[str, Any]:
    """How `model` writes boxes, as keyword arguments of `parse_boxes`, `format_box`,
    `score_localization_answer` and `localization_answer`: its family, `frame` (None: the
    `default_frame`) and, for LLaVA, its image side (the "crop" window depends on it; it is not
    always LLaVA-1.5's 336 px)."""
    kwargs: dict[str, Any] = {"family": model.cfg.family, "frame": frame or default_frame(model)}
    if model.cfg.family == "llava":
        kwargs["crop_size"] = model.preprocessing.image_size
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
    limit: int | None = None,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Greedy answers of `model` on every sample of `dataset` for `task`, scored (see the module
    docstring for the columns). `intervention` adds hooks built from each batch's inputs. An empty
    dataset raises ValueError. `run`: a run directory to record the rows in and resume from
    (`hooked_vlm.runs`; one item per sample, its one or two queries)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    boxes = box_format(model, frame)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[task]
    items = [Item(sample_id, sample_id, load) for sample_id, load in sample_sources(dataset, limit)]

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        answered: dict[str, list[dict]] = {}
        for batch in batched(_queries(pending, task), batch_size):  # binary: a sample's two queries
            images = [image for _, _, image, _, _ in batch]
            prompts = [task_prompt(task, sample) for _, sample, _, _, _ in batch]
            inputs = model.prepare(images, prompts)
            hooks = intervention(model, inputs, [s for _, s, _, _, _ in batch]) if intervention else []
            responses = model.generate(inputs, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
            for (key, sample, _, kind, last), prompt, response in zip(batch, prompts, responses):
                row = _score(task, sample, kind, prompt, response, boxes) | {"condition": condition}
                answered.setdefault(key, []).append(row)
                if last:
                    yield key, answered.pop(key)

    settings = {"task": task, "condition": condition, "intervention": intervention, "max_new_tokens": max_new_tokens,
                "box_format": boxes, "limit": limit}  # fmt: skip
    work = Work("evaluate", items, compute, settings=settings, model=model, desc=f"{task} [{condition}]", unit="sample")
    return execute(work, run, progress=progress)


def _queries(items: list[Item], task: Task):
    """(key, sample, image, kind, last query of the sample) of each item's samples' queries."""
    for item in items:
        asked = list(queries([item.payload()], task))
        for index, (sample, image, kind) in enumerate(asked):
            yield item.key, sample, image, kind, index == len(asked) - 1


def queries(samples: Iterable[Sample], task: Task):
    """(sample, image, kind): binary classification also asks about the object-removed image."""
    for sample in samples:
        yield sample, sample.image, "original"
        if task == "binary" and sample.removed_image is not None:
            yield sample, sample.removed_image, "removed"


def _score(task: Task, sample: Sample, kind: str, prompt: str, response: str, boxes: dict[str, Any]) -> dict:
    row = {"sample_id": sample.id, "class_name": sample.class_name, "task": task, "prompt": prompt, "response": response}
    if task == "localization":
        width, height = sample.image_size
        scored = score_localization_answer(response, sample.box, sample.image_size, **boxes)
        return row | {"image_width": width, "image_height": height, "gt_box": tuple(sample.box)} | scored
    if task == "list":
        return row | {"correct": classification_correct(response, sample.class_name)}
    answer = binary_answer(response)
    present = kind == "original"
    return row | {"image": kind, "present": present, "answer": answer, "correct": answer is not None and answer == present}


def summarize(results: pd.DataFrame, by: str | Sequence[str] = "condition") -> pd.DataFrame:
    """The paper's numbers per condition: localization score and hits, or accuracy."""
    from hooked_vlm.scoring import summarize_binary, summarize_classification, summarize_localization

    if results.empty:
        raise ValueError("no results to summarize (the table is empty)")
    tasks = results["task"].unique()
    if len(tasks) > 1:
        raise ValueError(f"the table mixes tasks {list(tasks)}: summarize each, e.g. results[results.task == {tasks[0]!r}]")
    task = tasks[0]
    if task == "localization":
        return summarize_localization(results, by=by)
    if task == "list":
        return summarize_classification(results, by=by)
    return summarize_binary(results, by=by)
