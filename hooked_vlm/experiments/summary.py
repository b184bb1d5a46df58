"""`summarize`: the paper's numbers from an experiment's rows, per condition, and over seeds.

Rows of excluded samples (`excluded` set: never asked, see `evaluate.exclusion`) are left out of
every number and counted in `n_excluded`; `truncated` is the share of answers cut by
`max_new_tokens` (the `finished` column; PROTOCOL-AUDIT A7); `n_float_boxes` (InternVL
localization) counts the answers whose box was written as [0, 1] floats (the `float_box` column,
read as the `float_boxes` setting says; PROTOCOL-AUDIT B2).

`over_seeds=True` reports random, shuffle, extension and knockout-control conditions as the
paper does (§1.4.4, §1.5): the number is computed per seed, then `mean` and `sd` (sample sd) are
taken over the seeds, with `n_seeds`. Conditions are grouped by their name without the seed
suffix (" s1"); a condition without seeds (the baseline) has `n_seeds` 1 and sd NaN.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

SEED_SUFFIX = r" s\d+$"  # how every experiment names a seeded condition: "random 8% s1"


def summarize(results: pd.DataFrame, by: str | Sequence[str] = "condition", *, over_seeds: bool = False) -> pd.DataFrame:
    """The paper's numbers per group of `by`: localization score and hits, or accuracy (see the
    module docstring for `n_excluded`, `truncated`, `n_float_boxes` and `over_seeds`)."""
    if results.empty:
        raise ValueError("no results to summarize (the table is empty)")
    tasks = results["task"].unique()
    if len(tasks) > 1:
        raise ValueError(f"the table mixes tasks {list(tasks)}: summarize each, e.g. results[results.task == {tasks[0]!r}]")
    if over_seeds:
        return _over_seeds(results, by)
    excluded = _excluded(results)
    kept = results[~excluded]
    if kept.empty:
        raise ValueError(f"every one of the {len(results)} rows is excluded (see the `excluded` column): nothing to summarize")
    table = _numbers(kept, tasks[0], by)
    keys = [by] if isinstance(by, str) else list(by)
    table["n_excluded"] = results[excluded].groupby(keys).size().reindex(table.index, fill_value=0) if excluded.any() else 0
    if "finished" in kept:
        table["truncated"] = kept.groupby(keys)["finished"].agg(lambda v: float(np.mean(v.eq(False)))).reindex(table.index)
    if "float_box" in kept:
        table["n_float_boxes"] = kept.groupby(keys)["float_box"].agg(lambda v: int(v.eq(True).sum())).reindex(table.index)
    return table


def _numbers(results: pd.DataFrame, task: str, by) -> pd.DataFrame:
    from hooked_vlm.scoring import summarize_binary, summarize_classification, summarize_localization

    if task == "localization":
        return summarize_localization(results, by=by)
    if task == "list":
        return summarize_classification(results, by=by)
    return summarize_binary(results, by=by)


def _excluded(results: pd.DataFrame) -> pd.Series:
    if "excluded" not in results:
        return pd.Series(False, index=results.index)
    return results["excluded"].notna() & results["excluded"].astype(str).ne("")


def _over_seeds(results: pd.DataFrame, by) -> pd.DataFrame:
    if "seed" not in results:
        raise ValueError("over_seeds needs a `seed` column (random, shuffle, extension or knockout results)")
    keys = [by] if isinstance(by, str) else list(by)
    table = results.copy()
    if "condition" in keys:  # "random 8% s1" -> "random 8%": the seeds of one condition
        table["condition"] = table["condition"].str.replace(SEED_SUFFIX, "", regex=True)
    table["_seed"] = table["seed"].astype("Float64").fillna(-1)  # the baseline has no seed: one group
    per_seed = summarize(table, [*keys, "_seed"])
    numbers = [c for c in per_seed.columns if c not in ("n", "n_excluded", "n_float_boxes")]
    grouped = per_seed.groupby(level=keys, sort=True)
    out = grouped[numbers].agg(["mean", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")])
    out.columns = [f"{name}_{'mean' if stat == 'mean' else 'sd'}" for name, stat in out.columns]
    out.insert(0, "n_seeds", grouped.size())
    out.insert(1, "n", grouped["n"].sum())
    if "n_float_boxes" in per_seed:  # a count: over every seed's answers, like n
        out["n_float_boxes"] = grouped["n_float_boxes"].sum()
    return out
