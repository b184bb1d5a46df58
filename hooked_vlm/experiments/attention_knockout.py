"""`attention_knockout`: in which layers does the text read the object's tokens? (PAPER_PROTOCOL
§1.8, Figure 3, appendix Figure 12.)

Attention from every token after the image span — prompt text and every generated token
(`after_image(include_generated=True)`; the method text, not Neo et al.'s last token only) — to
the object's tokens (its mask on the token grid, dilated by each `padding`; every view) is
blocked in all heads of a window of layers. Windows: contiguous non-overlapping groups of
`group_size` layers from layer 0 (§1.11.4; a last group shorter than the rest is kept), and
"all" = every layer at once.

Control ("random"): for each seed (three by default, reported as mean +- sd over seeds with
`summarize(..., over_seeds=True)`), as many random image tokens per sample as the object set
holds (size-matched; for InternVL view by view), seeded per sample, drawn from all image tokens
— the object's included, as in the random ablation control — or, with `exclude_object=True`,
from the tokens outside the object set only (a large object would otherwise share much of its
control; where a view has fewer tokens outside the object than in it, the control takes them
all, and `n_blocked` says how many).

Output columns: the `evaluate` columns of the task (`condition` e.g. "object+1 L4–7"), then
`group_size` (the nominal size; the number of layers for "all"), `layer_start`, `layer_end`
(inclusive), `layers` (label "4–7", "5" for one layer, "all"), `target` ("baseline", "object",
"random"), `padding`, `seed` (random only) and `n_blocked` (key tokens blocked in the row).
Baseline rows have NA window and padding. One row per query and condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd

from hooked_vlm import interventions as iv
from hooked_vlm.experiments._conditions import (
    Condition, check_choices, check_ints, check_task, conditions_work, object_set, random_set, sample_rows,
)  # fmt: skip
from hooked_vlm.experiments.data import Sample, SampleMode
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Run, execute

CONTROLS = ("random",)
GroupSize = int | Literal["all"]


def attention_knockout(
    model,
    dataset: Any,
    *,
    task: Literal["localization", "list"] = "localization",
    group_size: GroupSize | Sequence[GroupSize] = (4, "all"),
    paddings: Sequence[int] = (0, 1),
    controls: Sequence[str] = ("random",),
    seeds: Sequence[int] = (0, 1, 2),
    exclude_object: bool = False,
    batch_size: int = 8,
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    frame=None,
    max_new_tokens: int | None = None,
    match: str = "word",
    float_boxes: str = "official",
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """The baseline and, for every layer window, padding and target, the knocked-out model (see
    the module docstring). `group_size`: one size, "all", or several (appendix: 1, 4, 6).
    `seeds`, `exclude_object`: the random control's (module docstring). `limit`, `sample`,
    `sample_seed`: which samples (`experiments.data.sample_sources`); `frame`, `max_new_tokens`,
    `match`, `float_boxes`: `evaluate`'s. `run`: a run directory to record the rows in and resume from
    (`hooked_vlm.runs`; one item per condition and sample)."""
    check_task(task)
    windows = layer_windows(model.cfg.text.n_layers, group_size)
    paddings = check_ints(paddings, "paddings")
    controls = check_choices(controls, CONTROLS, "controls", allow_empty=True)
    seeds = check_ints(seeds, "seeds") if controls else []
    unmodified = lambda model, inputs, samples: ([], [{"n_blocked": 0}] * len(samples))
    conditions = [Condition("baseline", {"target": "baseline"}, unmodified)]
    for size, start, end in windows:
        label = layer_label(start, end, model.cfg.text.n_layers)
        window = {"group_size": size, "layer_start": start, "layer_end": end, "layers": label}
        for padding in paddings:
            labels, name = {**window, "padding": padding}, f"{padding:+d} L{label}"
            build = _knocking_out(start, end, padding)
            conditions.append(Condition(f"object{name}", {**labels, "target": "object"}, build))
            for seed in seeds:
                build = _knocking_out(start, end, padding, seed, exclude_object)
                random_labels = {**labels, "target": "random", "seed": seed}
                conditions.append(Condition(f"random{name} s{seed}", random_labels, build))
    settings = {"windows": windows, "paddings": paddings, "controls": controls, "seeds": seeds,
                "exclude_object": bool(exclude_object)}  # fmt: skip
    work = conditions_work(
        "attention_knockout", model, dataset, task, conditions,
        columns=["group_size", "layer_start", "layer_end", "layers", "target", "padding", "seed", "n_blocked"],
        int_columns=("group_size", "layer_start", "layer_end", "padding", "seed", "n_blocked"),
        settings=settings, desc=f"attention knockout ({task})",
        batch_size=batch_size, limit=limit, sample=sample, sample_seed=sample_seed, frame=frame,
        max_new_tokens=max_new_tokens, match=match, float_boxes=float_boxes,
    )  # fmt: skip
    return execute(work, run, progress=progress)


def layer_windows(n_layers: int, group_size: GroupSize | Sequence[GroupSize]) -> list[tuple[int, int, int]]:
    """(group size, first layer, last layer) of every window: for each size, contiguous
    non-overlapping groups from layer 0 (the last may be shorter; a size above the depth gives
    one window of every layer); "all" is one window of every layer. A window given by two sizes
    is kept once, under the first."""
    sizes = list(group_size) if isinstance(group_size, Sequence) and not isinstance(group_size, str) else [group_size]
    if not sizes:
        raise ValueError('group_size is empty: give a size, "all", or a list of them')
    windows: dict[tuple[int, int], int] = {}
    for size in sizes:
        if size == "all":
            size = n_layers
        elif isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f'a group size is an int or "all", got {size!r}')
        elif size < 1:
            raise ValueError(f"a group size must be >= 1 layer, got {size}")
        for start in range(0, n_layers, size):
            windows.setdefault((start, min(start + size, n_layers) - 1), size)
    return [(size, start, end) for (start, end), size in windows.items()]


def layer_label(start: int, end: int, n_layers: int) -> str:
    if (start, end) == (0, n_layers - 1) and n_layers > 1:
        return "all"
    return str(start) if start == end else f"{start}–{end}"


def _knocking_out(start: int, end: int, padding: int, seed: int | None = None, exclude_object: bool = False):
    def build(model, inputs: VLMInput, samples: list[Sample]):
        target = object_set(inputs, samples, padding)
        if seed is not None and exclude_object:
            outside = iv.image_tokens(inputs) - target
            target = random_set(inputs, samples, _at_most(inputs, target, outside), seed, within=outside, per_view=True)
        elif seed is not None:  # size-matched control, view by view (InternVL)
            target = random_set(inputs, samples, target, seed, per_view=True)
        source = iv.after_image(inputs, include_generated=True)  # §1.8: prompt and generated tokens
        hooks = iv.attention_knockout(model, source, target, layers=range(start, end + 1))
        return hooks, [{"n_blocked": int(target.mask[row].sum())} for row in sample_rows(inputs)]

    return build


def _at_most(inputs: VLMInput, tokens: iv.TokenSet, available: iv.TokenSet) -> iv.TokenSet:
    """`tokens` thinned, view by view, to no more tokens than `available` holds there (only its
    size per view matters: it is the size the random control matches)."""
    groups, mask = iv.view_groups(inputs), tokens.mask.clone()
    for row in range(mask.shape[0]):
        for group in groups[row][mask[row]].unique().tolist():
            members = (mask[row] & (groups[row] == group)).nonzero().flatten()
            mask[row, members[int((available.mask[row] & (groups[row] == group)).sum()) :]] = False
    return iv.TokenSet(mask)
