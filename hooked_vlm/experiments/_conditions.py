"""Plumbing shared by the token experiments (ablation, shuffle, extension, knockout).

An experiment is a list of `Condition`s: labels (the condition columns, equal for every query)
and a builder that turns one batch's `inputs.layout` into hooks plus per-query columns (token
counts). `conditions_work` is its work for `hooked_vlm.runs`: one item per (condition, sample),
each batch of a condition's pending samples one `evaluate` call; its table is one tidy table.

Random token choices are seeded per *sample* (`per_sample_seed`), not per batch, so a sample gets the
same random tokens whatever its batch and batch size.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch

from hooked_vlm import interventions as iv
from hooked_vlm.experiments.data import Sample, SampleMode, batched, sample_sources
from hooked_vlm.experiments.evaluate import MAX_NEW_TOKENS, box_format, evaluate
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Item, Work
from hooked_vlm.runs.work import concatenated

# (model, inputs, samples) -> (hooks, one dict of extra columns per sample, in sample order)
Builder = Callable[[Any, VLMInput, list[Sample]], tuple[list, list[dict]]]
TOKEN_TASKS = ("localization", "list")  # the tasks these experiments report (§1.4-1.8)
VIEW_SETS = ("all", "global", "local")


@dataclass(frozen=True)
class Condition:
    name: str  # evaluate's `condition` label, e.g. "object+1"
    labels: dict[str, Any] = field(default_factory=dict)
    build: Builder | None = None  # None: the unmodified model


def conditions_work(
    name: str,
    model,
    dataset: Any,
    task: str,
    conditions: Sequence[Condition],
    *,
    columns: Sequence[str],
    int_columns: Sequence[str] = (),
    settings: dict[str, Any],
    desc: str,
    batch_size: int = 8,
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    finish: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    **evaluate_kwargs: Any,
) -> Work:
    """The work of `evaluate` under every condition: one item per (condition, sample), grouped by
    sample (a process takes a sample under every condition). Pending samples of a condition are
    evaluated in batches. The table has the evaluate columns, then `columns` (labels and builder
    columns; missing ones are NA); `int_columns` become nullable integers; `finish` rewrites it.
    `limit`, `sample`, `sample_seed` choose the samples (`sample_sources`)."""
    sources = sample_sources(dataset, limit, sample=sample, sample_seed=sample_seed)
    items = [Item(f"{c.name}|{sample_id}", sample_id, (c, sample_id, load)) for c in conditions for sample_id, load in sources]

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        for _, same_condition in itertools.groupby(pending, key=lambda item: item.payload[0].name):
            for batch in batched(list(same_condition), batch_size):
                condition = batch[0].payload[0]
                rows = _evaluated(model, [item.payload[2]() for item in batch], task, condition, batch_size, evaluate_kwargs)
                yield from ((item.key, rows[item.payload[1]]) for item in batch)

    def table(rows_per_item: list[list[dict]]) -> pd.DataFrame:
        table = concatenated(rows_per_item)  # an excluded sample's rows lack the answer columns: all columns, in order
        evaluate_columns = [c for c in dict.fromkeys(k for rows in rows_per_item for row in rows for k in row) if c not in columns]
        table = table.reindex(columns=evaluate_columns + list(columns))
        for column in int_columns:
            table[column] = pd.to_numeric(table[column]).astype("Int64")
        return finish(table) if finish else table

    frame, max_new_tokens = evaluate_kwargs.get("frame"), evaluate_kwargs.get("max_new_tokens")
    boxes = box_format(model, frame, evaluate_kwargs.get("float_boxes", "official"))
    answers = {"box_format": boxes, "max_new_tokens": max_new_tokens or MAX_NEW_TOKENS[task],
               "match": evaluate_kwargs.get("match", "word")}  # fmt: skip
    settings = {"task": task, **settings, "limit": limit, "sample": sample, "sample_seed": sample_seed, "data": sources.data, **answers}
    return Work(name, items, compute, table, settings=settings, model=model, desc=desc, unit="query")


def _evaluated(model, samples: list[Sample], task: str, condition: Condition, batch_size: int, kwargs) -> dict[str, list[dict]]:
    """Each sample's rows under `condition`: `evaluate`'s, then the condition's labels and the
    builder's per-query columns."""
    extra: list[dict] = []

    def intervention(model, inputs, samples):
        hooks, stats = condition.build(model, inputs, samples) if condition.build else ([], [{}] * len(samples))
        extra.extend(stats)
        return hooks

    table = evaluate(model, samples, task, intervention=intervention, condition=condition.name, batch_size=batch_size,
                     sample="first", progress=False, **kwargs)  # fmt: skip
    rows: dict[str, list[dict]] = {}
    stats = iter(extra)
    for row in table.to_dict("records"):
        excluded = isinstance(row.get("excluded"), str)
        row = {k: v for k, v in row.items() if not (excluded and _is_missing(v))}  # columns it never had
        asked = {} if excluded else next(stats)  # an excluded query was never built
        rows.setdefault(row["sample_id"], []).append(row | condition.labels | asked)
    if next(stats, None) is not None:
        raise RuntimeError(f"{condition.name}: more token counts than answered queries")
    return rows


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


# ---------------------------------------------------------------------------------- checks
def check_task(task: str) -> str:
    if task not in TOKEN_TASKS:
        raise ValueError(f"unknown task {task!r} for this experiment; expected one of {TOKEN_TASKS}")
    return task


def check_views(model, views: str) -> str:
    if views not in VIEW_SETS:
        raise ValueError(f"unknown view set {views!r}; expected one of {VIEW_SETS}")
    if views != "all" and model.cfg.family != "internvl":
        family = model.cfg.family
        raise ValueError(f"views={views!r} needs InternVL's tiles and thumbnail; a {family} model has one view")
    return views


def check_ints(values: Iterable[int] | int, what: str, *, minimum: int | None = None) -> list[int]:
    """A non-empty list of distinct ints (a single int is a list of one)."""
    values = [values] if isinstance(values, int) else list(values)
    if not values:
        raise ValueError(f"{what} is empty: give at least one value")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must hold ints, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{what} must be >= {minimum}, got {value}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} repeats a value: {values}")
    return values


def check_choices(
    values: Iterable[str] | str, known: Sequence[str], what: str, *, allow_empty: bool = False
) -> list[str]:
    """A list of known names, deduplicated in order (a single string is a list of one)."""
    values = [values] if isinstance(values, str) else list(values)
    if not values and not allow_empty:
        raise ValueError(f"{what} is empty: choose from {tuple(known)}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected some of {tuple(known)}")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------- token sets
def per_sample_seed(seed: int, sample: Sample) -> int:
    """A seed for one sample's random draw: depends on the seed and the sample id only."""
    return zlib.crc32(f"{seed}/{sample.id}".encode())


def sample_rows(inputs: VLMInput) -> list[int]:
    """The batch row of each sample (one image per prompt, in sample order)."""
    return list(inputs.layout.image_batch_row)


def only_row(tokens: iv.TokenSet, row: int) -> iv.TokenSet:
    mask = torch.zeros_like(tokens.mask)
    mask[row] = tokens.mask[row]
    return iv.TokenSet(mask, tokens.include_generated)


def object_set(inputs: VLMInput, samples: list[Sample], padding: int = 0, views: str = "all") -> iv.TokenSet:
    """Each sample's object tokens (its mask on the token grid, grown or shrunk by `padding`
    rings in the image, tiles joined, see `iv.object_tokens`, §1.4); an object eroded away
    selects nothing."""
    return iv.object_tokens(inputs, [s.mask for s in samples], dilation=padding, views=views, allow_empty=True)


def random_set(
    inputs: VLMInput,
    samples: list[Sample],
    k: float | iv.TokenSet,
    seed: int,
    *,
    within: iv.TokenSet | None = None,
    per_view: bool = True,
) -> iv.TokenSet:
    """`random_tokens` drawn row by row with each sample's own seed (see `per_sample_seed`)."""
    within = iv.image_tokens(inputs) if within is None else within
    mask = torch.zeros_like(within.mask)
    for sample, row in zip(samples, sample_rows(inputs)):
        size = only_row(k, row) if isinstance(k, iv.TokenSet) else k
        row_seed, row_within = per_sample_seed(seed, sample), only_row(within, row)
        mask |= iv.random_tokens(inputs, size, seed=row_seed, within=row_within, per_view=per_view).mask
    return iv.TokenSet(mask)


def per_sample_hooks(inputs: VLMInput, samples: list[Sample], seed: int, build: Callable[[int, int], list]) -> list:
    """Hooks of a seeded rearrangement built row by row: `build(row, seed)` for each sample."""
    rows = zip(samples, sample_rows(inputs))
    return list(itertools.chain.from_iterable(build(row, per_sample_seed(seed, sample)) for sample, row in rows))


def token_counts(model, inputs: VLMInput, tokens: iv.TokenSet, name: str) -> list[dict]:
    """Per sample: `n_{name}`, `n_image_tokens`, `pct_{name}` (% of the image's tokens); for
    InternVL also `n_{name}_global`/`_local` and `pct_{name}_global`/`_local` (% of that view
    kind's tokens; NaN when the image has none, e.g. a lone tile has no local view)."""
    kinds = ("all", "global", "local") if model.cfg.family == "internvl" else ("all",)
    available_of = {kind: iv.image_tokens(inputs, kind).mask for kind in kinds}
    rows = []
    for row in sample_rows(inputs):
        counts = {}
        for kind in kinds:
            available = available_of[kind][row]
            n, total = int((tokens.mask[row] & available).sum()), int(available.sum())
            suffix = "" if kind == "all" else f"_{kind}"
            counts[f"n_{name}{suffix}"] = n
            if kind == "all":
                counts["n_image_tokens"] = total
            counts[f"pct_{name}{suffix}"] = 100.0 * n / total if total else float("nan")
        rows.append(counts)
    return rows


def count_columns(model, name: str) -> list[str]:
    """The columns `token_counts` fills, in order."""
    columns = [f"n_{name}", "n_image_tokens", f"pct_{name}"]
    if model.cfg.family == "internvl":
        columns += [f"n_{name}_global", f"n_{name}_local", f"pct_{name}_global", f"pct_{name}_local"]
    return columns
