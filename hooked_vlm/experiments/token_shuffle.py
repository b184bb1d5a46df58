"""`token_shuffle`: does the model read an object's position from where its tokens sit, or from
what they contain? (PAPER_PROTOCOL §1.5, Table 2.)

Image tokens are permuted among their own positions at the language model's input
(`hook_inputs_embeds`), within each `scope`, with a uniformly random permutation per sample and
seed (a token may stay put):

- `full`: every image token;
- `object`: only the object's tokens (its mask on the token grid, every token it overlaps by
  >= 1 pixel) — for InternVL in the tiles and the thumbnail alike.

Scope (InternVL; LLaVA has one view, so every scope is the same; the paper does not say,
PROTOCOL-AUDIT A5): "sheet" (default) permutes InternVL's local tiles of an image as one grid
and the thumbnail on its own — the grouping dilation and object extension use, so a token can
cross a tile seam; "view" permutes each tile separately (tile-level position survives, and an
object's tokens never cross a seam); "image" permutes every image token of an image together,
thumbnail and tiles mixed.

Output columns: the `evaluate` columns of the task (`condition` e.g. "object s1"), then `mode`
("baseline", "full", "object"), `seed` (NA for the baseline), `scope` and `n_shuffled` (tokens
in the shuffled set). One row per query and condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd

from hooked_vlm import interventions as iv
from hooked_vlm.experiments._conditions import (
    Condition, check_choices, check_ints, check_task, conditions_work, object_set, only_row, per_sample_hooks,
    sample_rows,
)  # fmt: skip
from hooked_vlm.experiments.data import Sample, SampleMode
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Run, execute

MODES = ("full", "object")
SCOPES = ("view", "sheet", "image")


def token_shuffle(
    model,
    dataset: Any,
    *,
    task: Literal["localization", "list"] = "localization",
    modes: Sequence[str] = MODES,
    seeds: Sequence[int] = (0, 1, 2),
    scope: Literal["view", "sheet", "image"] = "sheet",
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
    """The baseline and each (mode, seed) shuffle on `dataset` (see the module docstring; `scope`
    there). `limit`, `sample`, `sample_seed`: which samples (`experiments.data.sample_sources`);
    `frame`, `max_new_tokens`, `match`, `float_boxes`: `evaluate`'s. `run`: a run directory to record the rows in
    and resume from (`hooked_vlm.runs`; one item per condition and sample)."""
    check_task(task)
    modes = check_choices(modes, MODES, "shuffle modes")
    seeds = check_ints(seeds, "seeds")
    if scope not in SCOPES:
        raise ValueError(f"unknown shuffle scope {scope!r}; expected one of {SCOPES}")
    conditions = [Condition("baseline", {"mode": "baseline", "scope": scope}, _shuffling("baseline", 0, scope))]
    for mode in modes:
        for seed in seeds:
            labels = {"mode": mode, "seed": seed, "scope": scope}
            conditions.append(Condition(f"{mode} s{seed}", labels, _shuffling(mode, seed, scope)))
    work = conditions_work(
        "token_shuffle", model, dataset, task, conditions, columns=["mode", "seed", "scope", "n_shuffled"],
        int_columns=("seed", "n_shuffled"), settings={"modes": modes, "seeds": seeds, "scope": scope},
        desc=f"token shuffle ({task})", batch_size=batch_size, limit=limit, sample=sample, sample_seed=sample_seed,
        frame=frame, max_new_tokens=max_new_tokens, match=match, float_boxes=float_boxes,
    )  # fmt: skip
    return execute(work, run, progress=progress)


def _shuffling(mode: str, seed: int, scope: str):
    def build(model, inputs: VLMInput, samples: list[Sample]):
        if mode == "baseline":
            return [], [{"n_shuffled": 0}] * len(samples)
        tokens = iv.image_tokens(inputs) if mode == "full" else object_set(inputs, samples)

        def one(row: int, row_seed: int) -> list:  # §1.5; the scope is ours (see the module docstring)
            grouping = {"per_view": scope != "image", "by_sheet": scope == "sheet"}
            return iv.token_shuffle(model, inputs, only_row(tokens, row), **grouping, seed=row_seed)

        hooks = per_sample_hooks(inputs, samples, seed, one)
        return hooks, [{"n_shuffled": int(tokens.mask[row].sum())} for row in sample_rows(inputs)]

    return build
