"""The parts of the reproduction: each runs the paper's experiment(s) on one model, every
experiment a run of `hooked_vlm.runs` in `<model folder>/<part>/<step>/` (resumed after a kill),
and returns our numbers in the paper's rows: a table of part, row, task, value (%), sd (over
seeds, when there are several), n (samples).

A part's settings are the paper's (PAPER_PROTOCOL §1.4-§1.10) and fixed here; how many samples
(`Context.limit`), the CMA pairs (`cma_pairs`, 50) and the IG steps (50) are the caller's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from hooked_vlm import plotting
from hooked_vlm.runs import Run, write_atomically

TASKS = ("localization", "list")
KNOCKOUT_GROUP = 4  # the paper's windows of 4 layers (§1.8), and "all"
SMALL_MODEL_LAYERS = 8  # below this, windows of one layer (a curve rather than one window)


@dataclasses.dataclass
class Context:
    """One model's reproduction: the model, its data, its folder and what every run records."""

    model: Any
    data: Any
    folder: Path
    arguments: dict[str, Any]
    mean: Callable[[], Any]  # the mean visual embedding, computed (or read) on first use
    limit: int | None = None
    cma_pairs: int = 50
    ig_steps: int = 50
    seed: int = 0
    batch_size: int = 8
    progress: bool = True

    def run(self, part: str, step: str) -> Run:
        return Run(self.folder / part / step, arguments=self.arguments, model_name=self.arguments.get("model"),
                   launch={"batch_size": self.batch_size})  # fmt: skip

    def common(self, part: str, step: str) -> dict[str, Any]:
        """The keyword arguments every experiment call of a part shares."""
        return dict(batch_size=self.batch_size, limit=self.limit, progress=self.progress, run=self.run(part, step))

    def figure(self, part: str, name: str, figure) -> None:
        if self.run(part, name).is_main:
            plotting.save_figure(figure, self.folder / part / f"{name}.png")


# ---------------------------------------------------------------------------------- scoring
def metric(task: str) -> str:
    return "loc_score" if task == "localization" else "correct"


def scored(table: pd.DataFrame, task: str, rows: dict[str, str], column: str = "condition") -> list[dict]:
    """Our numbers for the paper's rows: `rows` maps a condition (its seed suffix " s<k>" dropped:
    seeds are averaged, their sd reported) to the paper's row name."""
    values = table[metric(task)].astype(float) * 100
    conditions = table[column].astype(str)
    seeds = conditions.str.extract(r" s(\d+)$")[0].fillna("-")
    stems = conditions.str.replace(r" s\d+$", "", regex=True)
    frame = pd.DataFrame({"stem": stems, "seed": seeds, "value": values, "sample": table["sample_id"]})
    out = []
    for stem, row in rows.items():
        mine = frame[frame.stem == stem]
        if mine.empty:
            continue
        per_seed = mine.groupby("seed")["value"].mean()
        sd = float(per_seed.std()) if len(per_seed) > 1 else float("nan")
        out.append({"row": row, "task": task, "value": float(per_seed.mean()), "sd": sd, "n": int(mine["sample"].nunique())})
    return out


# ---------------------------------------------------------------------------------- the parts
def baseline(ctx: Context) -> list[dict]:
    from hooked_vlm.experiments import evaluate

    rows = []
    for task in TASKS:
        table = evaluate(ctx.model, ctx.data, task, **ctx.common("baseline", task))
        rows += scored(table, task, {"baseline": "baseline"})
    return rows


TABLE1_ROWS = {"baseline": "baseline", "object+0": "object", "object+1": "object +1", "object+2": "object +2",
               "object-1": "object -1", "ig 8%": "IG 8%", "random 8%": "random 8%", "register": "register"}  # fmt: skip


def table1(ctx: Context) -> list[dict]:
    """Token ablation with the ImageNet mean: the object (−1…+2 rings), IG and random at 8%
    (3 seeds), register tokens."""
    from hooked_vlm.experiments import token_ablation

    rows = []
    for task in TASKS:
        table = token_ablation(ctx.model, ctx.data, task=task, strategies=("object", "random", "register", "ig"),
                               paddings=(-1, 0, 1, 2), fractions=(0.08,), seeds=(0, 1, 2), fill="mean", mean=ctx.mean(),
                               ig_steps=ctx.ig_steps, ig_baseline="mean", **ctx.common("table1", task))  # fmt: skip
        ctx.figure("table1", task, plotting.token_ablation_figure(table))
        rows += scored(table, task, TABLE1_ROWS)
    return rows


def table2(ctx: Context) -> list[dict]:
    """Token shuffle at the LLM input (3 seeds): all image tokens, or the object's only."""
    from hooked_vlm.experiments import token_shuffle

    rows = []
    for task in TASKS:
        table = token_shuffle(ctx.model, ctx.data, task=task, seeds=(0, 1, 2), **ctx.common("table2", task))
        ctx.figure("table2", task, plotting.token_shuffle_figure(table))
        rows += scored(table, task, {"baseline": "baseline", "full": "full shuffle", "object": "object shuffle"})
    return rows


def table3(ctx: Context) -> list[dict]:
    """InternVL only: the object (and +1 ring) ablated in the global thumbnail or the local tiles."""
    from hooked_vlm.experiments import token_ablation

    if ctx.model.cfg.family != "internvl":
        return []
    rows = []
    for task in TASKS:
        for views in ("global", "local"):
            table = token_ablation(ctx.model, ctx.data, task=task, strategies=("object",), paddings=(0, 1), fill="mean",
                                   mean=ctx.mean(), views=views, **ctx.common("table3", f"{task}-{views}"))  # fmt: skip
            names = {"object+0": f"{views} object", "object+1": f"{views} object +1"}
            rows += scored(table, task, names | ({"baseline": "baseline"} if views == "global" else {}))
    return rows


def figure1(ctx: Context) -> list[dict]:
    """Object extension: p rings of copied object tokens (10 seeds), scored against the ground
    truth grown by s token widths; the row "diagonal strongest" is 100 when every p's best s is p."""
    from hooked_vlm.experiments import extension_matrix, object_extension

    table = object_extension(ctx.model, ctx.data, paddings=(0, 1, 2), gt_scales=(0, 1, 2), seeds=tuple(range(10)),
                             **ctx.common("figure1", "extension"))  # fmt: skip
    ctx.figure("figure1", "extension", plotting.object_extension_figure(table))
    matrix = extension_matrix(table)
    rows = []
    for p in matrix.index:
        for s in matrix["mean"].columns:
            sd = matrix["sd"].loc[p, s] if "sd" in matrix else float("nan")
            rows.append({"row": f"p={p} s={s}", "task": "localization", "value": 100 * float(matrix["mean"].loc[p, s]),
                         "sd": 100 * float(sd), "n": int(table["sample_id"].nunique())})  # fmt: skip
    best = [int(matrix["mean"].loc[p].astype(float).idxmax()) == p for p in matrix.index if p > 0]
    rows.append({"row": "diagonal strongest", "task": "localization", "value": 100.0 * all(best), "sd": float("nan"),
                 "n": int(table["sample_id"].nunique())})  # fmt: skip
    return rows


def figure3(ctx: Context) -> list[dict]:
    """Attention knockout from every post-image token to the object (+1 ring) tokens, by windows
    of 4 layers (1 below 8 layers) and all layers."""
    from hooked_vlm.experiments import attention_knockout

    group = KNOCKOUT_GROUP if ctx.model.cfg.text.n_layers >= SMALL_MODEL_LAYERS else 1
    rows = []
    for task in TASKS:
        table = attention_knockout(ctx.model, ctx.data, task=task, group_size=[group, "all"], paddings=(0, 1), seeds=(0,),
                                   **ctx.common("figure3", task))  # fmt: skip
        ctx.figure("figure3", task, plotting.attention_knockout_figure(table))
        conditions = [c for c in table["condition"].astype(str).unique() if not c.startswith("random")]
        rows += scored(table, task, {c: c for c in conditions})
    return rows


def figures4_5(ctx: Context) -> list[dict]:
    """Causal mediation of every head (localization, and the binary question) on `cma_pairs`
    seeded pairs; then localization as the top heads of each ranking are removed."""
    from hooked_vlm.experiments import cumulative_head_ablation, head_mediation, mediation_map, normalised_auc, rank_heads

    # the paper's 50 pairs, drawn at random with the seed (COCO's file order is by category)
    n_pairs = ctx.cma_pairs if ctx.limit is None else min(ctx.cma_pairs, ctx.limit)
    options = dict(limit=n_pairs, sample="random", sample_seed=ctx.seed, batch_size=ctx.batch_size, progress=ctx.progress)
    maps = {}
    for task in ("localization", "binary"):
        table = head_mediation(ctx.model, ctx.data, task=task, run=ctx.run("figures4-5", f"mediation-{task}"), **options)
        ctx.figure("figures4-5", f"mediation-{task}", plotting.head_mediation_figure(table))
        maps[task] = mediation_map(table)
        n = int(table["pair_id"].nunique())
    rows = []
    for k in (10, 50):
        top = [set(rank_heads(maps[task], k)) for task in maps]
        rows.append({"row": f"top-{k} overlap", "task": "localization vs binary", "value": float(len(top[0] & top[1])), "sd": float("nan"), "n": n})
    rankings = {"localization-critical": maps["localization"], "classification-critical": maps["binary"]}
    table = cumulative_head_ablation(ctx.model, ctx.data, rankings, task="localization", low_importance_from="localization-critical",
                                     **ctx.common("figures4-5", "cumulative"))  # fmt: skip
    ctx.figure("figures4-5", "cumulative", plotting.cumulative_head_ablation_figure(table))
    for ranking, auc in normalised_auc(table).items():
        rows.append({"row": f"nAUC {ranking}", "task": "localization", "value": 100 * auc, "sd": float("nan"),
                     "n": int(table["sample_id"].nunique())})  # fmt: skip
    return rows


PARTS: dict[str, Callable[[Context], list[dict]]] = {
    "baseline": baseline,
    "table1": table1,
    "table2": table2,
    "table3": table3,
    "figure1": figure1,
    "figure3": figure3,
    "figures4-5": figures4_5,
}
NEEDS_MEAN = ("table1", "table3")


def slug(name: str) -> str:
    """A folder name for a model name or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).rstrip("/").split("/")[-1] if Path(str(name)).exists() else str(name)).strip("_")


def write_rows(path: Path, rows: list[dict]) -> None:
    write_atomically(path, lambda p: pd.DataFrame(rows, columns=["row", "task", "value", "sd", "n"]).to_csv(p, index=False))
