"""`cumulative_head_ablation`: accuracy as the top-ranked heads are removed (PAPER_PROTOCOL §1.10).

Heads are ranked (e.g. by mean mediation fraction for localization, for classification), the top
fraction f of them are zero-ablated (`hook_z`, so their contribution through `o_proj` vanishes) on
every forward and generated token, and the task is re-evaluated. The low-importance control
removes the heads whose |MF| is smallest. A normalised area under the curve summarises each
ranking: the mean of score / baseline score over the fractions (trapezoid rule), 1 = no effect.
Two more controls rank the same measured heads otherwise (`controls`): "negative_mf" removes the
heads of most negative MF first (patching them moves the base away from the source; Liu et al.),
"random_heads" removes them in a seeded random order (`control_seed`).

Only measured heads are ranked: a NaN score (e.g. the last layer's MF at the prompt positions,
which no patch there can reach, see `head_mediation`) is neither critical nor low-importance,
so the control never picks such heads because they look like MF 0. A fraction that needs more
heads than a ranking measured is an error (raised before anything runs).

Output columns: the `evaluate` columns, plus `ranking` (the name given, or a control's:
"low_importance", "negative_mf", "random_heads"), `fraction`, `n_heads_removed`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.boxes import Frame
from hooked_vlm.experiments.data import SampleMode, batched, chosen_samples, empty_dataset_error, sample_sources
from hooked_vlm.experiments.evaluate import MAX_NEW_TOKENS, Task, box_format, evaluate, queries, task_prompt
from hooked_vlm.experiments.head_mediation import rank_heads
from hooked_vlm.interventions import head_ablation, mean_head_activations
from hooked_vlm.runs import Item, Run, Work, execute

DEFAULT_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
CONTROLS = ("low_importance", "negative_mf", "random_heads")


def cumulative_head_ablation(
    model,
    dataset: Any,
    rankings: Mapping[str, Float[Tensor, "layer head"]],
    *,
    task: Task = "localization",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    low_importance_from: str | None = None,
    controls: Sequence[str] = ("low_importance",),
    control_seed: int = 0,
    value: Literal["zero", "mean"] = "zero",
    batch_size: int = 8,
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    frame: Frame | None = None,
    max_new_tokens: int | None = None,
    match: str = "word",
    float_boxes: str = "official",
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Evaluate `task` with the top `fraction` of heads of each ranking ablated.

    `rankings`: name -> a `[layer, head]` score (higher = more critical; NaN = not measured,
    never removed), e.g. `{"localization": mediation_map(mf_loc), "classification": mediation_map(mf_cls)}`.
    `low_importance_from`: the name of the ranking the `controls` reorder: "low_importance" (its
    least-|score| measured heads first), "negative_mf" (most negative first), "random_heads" (a
    random order, seeded by `control_seed`). `limit`, `sample`, `sample_seed`: which samples.
    `value`: "zero" (the paper), or "mean": each head's mean `z` over the prompts of `dataset`
    for `task` (real tokens, before any answer), computed once. `frame`, `max_new_tokens`, `match`
    and `float_boxes` are `evaluate`'s (None: the model's default box frame, the task's answer
    length). `run`: a run directory to record the rows in and resume from (`hooked_vlm.runs`; one
    item per ablated model and sample, the unablated model once for every ranking).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not rankings:
        raise ValueError("no rankings given")
    for name, scores in rankings.items():
        if tuple(torch.as_tensor(scores).shape) != (n_layers, n_heads):
            raise ValueError(f"ranking {name!r} has shape {tuple(torch.as_tensor(scores).shape)}; expected ({n_layers}, {n_heads})")
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must be a non-empty list in [0, 1], got {list(fractions)}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions repeats a value: {list(fractions)}")
    if value not in ("zero", "mean"):
        raise ValueError(f"unknown head ablation value {value!r} (expected 'zero' or 'mean')")
    orders = {name: rank_heads(scores, by="top") for name, scores in rankings.items()}
    controls = list(dict.fromkeys([controls] if isinstance(controls, str) else controls))
    if any(c not in CONTROLS for c in controls):
        raise ValueError(f"unknown controls {[c for c in controls if c not in CONTROLS]}; expected some of {CONTROLS}")
    if low_importance_from is not None:
        if low_importance_from not in rankings:
            raise ValueError(f"low_importance_from={low_importance_from!r} is not one of the rankings {list(rankings)}")
        orders |= control_orders(rankings[low_importance_from], controls, control_seed)
    _check_measured_heads(orders, fractions, n_layers * n_heads)  # before any forward
    described_value = value if value == "zero" else "the mean z of each head over the dataset's prompts"
    if value == "mean":
        value = _prompt_means(model, dataset, task, batch_size, {"limit": limit, "sample": sample, "sample_seed": sample_seed})

    steps = _steps(orders, fractions, n_layers * n_heads)
    sources = sample_sources(dataset, limit, sample=sample, sample_seed=sample_seed)
    items = [Item(f"{step.name}|{sample_id}", sample_id, (step, sample_id, load)) for step in steps for sample_id, load in sources]

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        for _, same_step in itertools.groupby(pending, key=lambda item: item.payload[0].name):
            for batch in batched(list(same_step), batch_size):
                step = batch[0].payload[0]

                def intervention(model, inputs, samples, heads=step.heads):
                    return head_ablation(model, heads, value) if heads else []

                table = evaluate(
                    model, [item.payload[2]() for item in batch], task, intervention=intervention, condition=step.name,
                    batch_size=batch_size, frame=frame, max_new_tokens=max_new_tokens, match=match,
                    float_boxes=float_boxes, progress=False,
                )  # fmt: skip
                rows = table.to_dict("records")
                for item in batch:
                    answers = [row for row in rows if row["sample_id"] == item.payload[1]]
                    yield item.key, [row | labels for labels in step.labels for row in answers]

    order = {(labels["ranking"], labels["fraction"]): i for i, labels in enumerate(l for step in steps for l in step.labels)}

    def table(rows_per_item: list[list[dict]]) -> pd.DataFrame:  # by fraction, then ranking (sorts are stable)
        rows = sorted((row for rows in rows_per_item for row in rows), key=lambda row: order[row["ranking"], row["fraction"]])
        return pd.DataFrame(rows)

    settings = {
        "task": task, "rankings": dict(rankings), "fractions": sorted(fractions), "low_importance_from": low_importance_from,
        "controls": controls if low_importance_from is not None else [], "control_seed": control_seed,
        "value": described_value, "limit": limit, "sample": sample, "sample_seed": sample_seed, "data": sources.data,
        "box_format": box_format(model, frame, float_boxes), "match": match,
        "max_new_tokens": max_new_tokens or MAX_NEW_TOKENS[task],
    }  # fmt: skip
    work = Work("cumulative_head_ablation", items, compute, table, settings=settings, model=model,
                desc=f"cumulative head ablation ({task})", unit="query")  # fmt: skip
    return execute(work, run, progress=progress)


@dataclass(frozen=True)
class _Step:
    """One ablated model: `heads` removed, answering for every (ranking, fraction) in `labels`
    (nothing removed answers for every fraction-0 condition at once)."""

    name: str
    heads: tuple[tuple[int, int], ...]
    labels: tuple[dict, ...]


def _steps(orders: Mapping[str, list], fractions: Sequence[float], n_heads: int) -> list[_Step]:
    """Fractions in increasing order, each with every ranking; the unablated model first, once."""
    unablated, steps = [], []
    for fraction in sorted(fractions):
        n_removed = heads_to_remove(fraction, n_heads)
        for name, order in orders.items():
            labels = {"condition": f"{name}@{fraction:g}", "ranking": name, "fraction": fraction, "n_heads_removed": n_removed}
            if n_removed == 0:
                unablated.append(labels)
            else:
                steps.append(_Step(labels["condition"], tuple(order[:n_removed]), (labels,)))
    return ([_Step("unablated", (), tuple(unablated))] if unablated else []) + steps


def heads_to_remove(fraction: float, n_heads: int) -> int:
    """How many heads the top `fraction` is: at least that share, ceil(fraction * n_heads), with
    the product rounded to 9 decimals first, since binary floats overshoot (0.07 * 1600 =
    112.00000000000001 would remove 113)."""
    return math.ceil(round(fraction * n_heads, 9))


def _check_measured_heads(orders: Mapping[str, list], fractions: Sequence[float], n_heads: int) -> None:
    most = heads_to_remove(max(fractions), n_heads)
    for name, order in orders.items():
        if len(order) < most:
            raise ValueError(
                f"ranking {name!r} measures {len(order)} of {n_heads} heads (the others are NaN: not measured, e.g. "
                f"the last layer's MF at the prompt positions), but fraction {max(fractions):g} removes {most}; "
                "choose smaller fractions"
            )


def control_orders(scores: Float[Tensor, "layer head"], controls: Sequence[str], seed: int = 0) -> dict[str, list]:
    """The control rankings of one ranking's measured heads (see the module docstring)."""
    orders = {}
    if "low_importance" in controls:
        orders["low_importance"] = rank_heads(scores, by="least_abs")
    if "negative_mf" in controls:
        orders["negative_mf"] = rank_heads(-torch.as_tensor(scores, dtype=torch.float64), by="top")
    if "random_heads" in controls:
        measured = rank_heads(scores, by="top")
        order = torch.randperm(len(measured), generator=torch.Generator().manual_seed(seed)).tolist()
        orders["random_heads"] = [measured[i] for i in order]
    return orders


def _prompt_means(model, dataset: Any, task: Task, batch_size: int, chosen: dict) -> dict[int, Tensor]:
    samples = chosen_samples(dataset, **chosen)
    batches = [
        model.prepare([image for _, image, _ in batch], [task_prompt(task, sample) for sample, _, _ in batch])
        for batch in batched(queries(samples, task), batch_size)
    ]
    if not batches:
        raise empty_dataset_error()
    return mean_head_activations(model, batches)


def normalised_auc(results: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """Per ranking: the area under (score / score at fraction 0) over the fractions, divided by
    the fraction range (trapezoid rule). 1 = removing heads never hurt; 0 = it destroyed the task
    at once. NaN for a ranking whose unablated score is 0 (or missing): there is nothing to lose,
    so no relative curve. `metric` defaults to `loc_score` (localization) or `correct`
    (classification)."""
    metric = metric or ("loc_score" if "loc_score" in results else "correct")
    curves = results.groupby(["ranking", "fraction"])[metric].mean().unstack("fraction")
    fractions = np.array(curves.columns, dtype=float)
    if len(fractions) < 2 or fractions[0] != 0:
        raise ValueError("normalised AUC needs fraction 0 (the baseline) and at least one more fraction")
    out = {}
    for ranking, curve in curves.iterrows():
        values = curve.to_numpy(dtype=float)
        base = values[0]
        if not base > 0:  # 0 or NaN: a relative curve is undefined (it was reported as 0, "destroyed")
            out[ranking] = float("nan")
            continue
        relative = values / base
        area = np.sum((relative[1:] + relative[:-1]) / 2 * np.diff(fractions))  # trapezoid rule
        out[ranking] = float(area / (fractions[-1] - fractions[0]))
    return pd.Series(out, name="normalised_auc")
