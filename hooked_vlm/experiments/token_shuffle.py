"""`token_shuffle`: does the model read an object's position from where its tokens sit, or from
what they contain? (PAPER_PROTOCOL §1.5, Table 2.)

Image tokens are permuted among their own positions at the language model's input
(`hook_inputs_embeds`), within each view, with a uniformly random permutation per sample and
seed (a token may stay put):

- `full`: every image token of each view;
- `object`: only the object's tokens (its mask on the token grid, every token it overlaps by
  >= 1 pixel), within each view — for InternVL in the tiles and the thumbnail alike.

Output columns: the `evaluate` columns of the task (`condition` e.g. "object s1"), then `mode`
("baseline", "full", "object"), `seed` (NA for the baseline) and `n_shuffled` (tokens in the
shuffled set). One row per query and condition.
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
from hooked_vlm.experiments.data import Sample
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Run, execute

MODES = ("full", "object")


def token_shuffle(
    model,
    dataset: Any,
    *,
    task: Literal["localization", "list"] = "localization",
    modes: Sequence[str] = MODES,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    limit: int | None = None,
    frame=None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """The baseline and each (mode, seed) shuffle on `dataset` (see the module docstring).
    `run`: a run directory to record the rows in and resume from (`hooked_vlm.runs`; one item per
    condition and sample)."""
    check_task(task)
    modes = check_choices(modes, MODES, "shuffle modes")
    seeds = check_ints(seeds, "seeds")
    conditions = [Condition("baseline", {"mode": "baseline"}, _shuffling("baseline", 0))]
    for mode in modes:
        for seed in seeds:
            conditions.append(Condition(f"{mode} s{seed}", {"mode": mode, "seed": seed}, _shuffling(mode, seed)))
    work = conditions_work(
        "token_shuffle", model, dataset, task, conditions, columns=["mode", "seed", "n_shuffled"],
        int_columns=("seed", "n_shuffled"), settings={"modes": modes, "seeds": seeds}, desc=f"token shuffle ({task})",
        batch_size=batch_size, limit=limit, frame=frame, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    return execute(work, run, progress=progress)


def _shuffling(mode: str, seed: int):
    def build(model, inputs: VLMInput, samples: list[Sample]):
        if mode == "baseline":
            return [], [{"n_shuffled": 0}] * len(samples)
        tokens = iv.image_tokens(inputs) if mode == "full" else object_set(inputs, samples)

        def one(row: int, row_seed: int) -> list:  # §1.5: within each view
            return iv.token_shuffle(model, inputs, only_row(tokens, row), per_view=True, seed=row_seed)

        hooks = per_sample_hooks(inputs, samples, seed, one)
        return hooks, [{"n_shuffled": int(tokens.mask[row].sum())} for row in sample_rows(inputs)]

    return build
