"""One figure per experiment, from the tidy table the experiment returns (what `hooked-vlm`
writes as `figure.png`). Scores are drawn per condition as means with 95% confidence intervals
over items, against the unablated baseline where the table has one.

    figure = plotting.attention_knockout_figure(attention_knockout(model, data))
"""

from __future__ import annotations

import pandas as pd
import torch
from matplotlib.figure import Figure

from hooked_vlm.plotting.charts import head_heatmap, layer_curves, matrix_plot, top_heads


def evaluate_figure(results: pd.DataFrame) -> Figure:
    y = _metric(results)
    kinds = {"original": "object present", "removed": "object removed"}  # binary asks about both images
    rows = results.assign(line=results["image"].map(kinds) if "image" in results else results["task"]).sort_values("class_name")
    return _curves(rows, x="class_name", line="line", y=y, baseline={"all classes": results[y].astype(float).mean()},
                   title=f"{results['task'].iloc[0]}: score per class", xlabel="class")  # fmt: skip


def token_ablation_figure(results: pd.DataFrame) -> Figure:
    ablated = results[results.strategy != "baseline"].copy()
    ablated["ablated"] = [
        f"object{p:+d}" if s == "object" else f"{s} {100 * f:g}%" if s in ("random", "ig") else s
        for s, p, f in zip(ablated["strategy"], ablated["padding"], ablated["fraction"])
    ]  # seeds pooled
    return _curves(ablated, x="ablated", line="strategy", y=_metric(results), baseline=_unablated(results, "strategy"),
                   title=f"Token ablation ({results['fill'].iloc[0]} fill; seeds pooled)", xlabel="tokens ablated")  # fmt: skip


def token_shuffle_figure(results: pd.DataFrame) -> Figure:
    return _curves(results[results["mode"] != "baseline"], x="mode", line="mode", y=_metric(results),
                   baseline=_unablated(results, "mode"), title="Token shuffle (seeds pooled)", xlabel="tokens shuffled")  # fmt: skip


def object_extension_figure(results: pd.DataFrame) -> Figure:
    return matrix_plot(results, row="padding", col="gt_scale", value="loc_score", fmt="{:.2f}",
                                title="Object extension: padding p x GT scale s")  # fmt: skip


def attention_knockout_figure(results: pd.DataFrame) -> Figure:
    """One line per target and padding (seeds pooled); with several window sizes, one per size,
    each ending at "all". The unablated score is the dashed baseline."""
    knocked = results[results.target != "baseline"].copy()
    knocked["line"] = [f"{t}{p:+d}" for t, p in zip(knocked["target"], knocked["padding"])]
    whole = knocked.layers == "all"
    sizes = sorted(set(knocked.loc[~whole, "group_size"]))
    if len(sizes) > 1:
        parts = [knocked[~whole & (knocked.group_size == s)].assign(size=s) for s in sizes]
        knocked = pd.concat(parts + [knocked[whole].assign(size=s) for s in sizes])
        knocked["line"] += [f", {s}-layer windows" for s in knocked["size"]]
    return _curves(knocked, x="layers", line="line", y=_metric(results), baseline=_unablated(results, "target"),
                   title="Attention knockout (text after the image -> object)", xlabel="layers knocked out")  # fmt: skip


def head_mediation_figure(results: pd.DataFrame) -> Figure:
    from hooked_vlm.experiments import mediation_map

    mf = mediation_map(results)
    return head_heatmap(mf, title="Mean mediation fraction", annotate_top=_notable_heads(mf))


def _notable_heads(mf: torch.Tensor, k: int = 5, share: float = 0.1) -> int:
    """How many of the top `k` heads carry at least `share` of the largest mean MF (none if no
    head is positive): labels on heads with MF ~1e-8 would read as findings."""
    top = float(torch.nan_to_num(mf, nan=-torch.inf).max())
    if not top > 0:
        return 0
    return sum(float(mf[layer, head]) >= share * top for layer, head in top_heads(mf, k))


def cumulative_head_ablation_figure(results: pd.DataFrame) -> Figure:
    return _curves(results, x="fraction", line="ranking", y=_metric(results), title="Cumulative head ablation",
                   xlabel="fraction of heads removed")


def position_probe_figure(results: pd.DataFrame) -> Figure:
    frame = results.groupby(["section", "layer"], sort=False)["accuracy"].mean().reset_index()
    frame["site"] = frame["section"] + " " + frame["layer"].astype(str)
    return layer_curves(frame.assign(condition="row/col mean"), x="site", y="accuracy", xlabel="layer")


def _curves(frame: pd.DataFrame, *, x: str, line: str, y: str, baseline: float | dict | None = None, **labels):
    """`layer_curves` of per-item rows: mean and 95% CI band per (line, x), the score axis 0..1. A
    line drawn at one x only gets an error bar, since a band there has no width."""
    fig = layer_curves(frame, x=x, y=y, condition=line, band="ci95", baseline=baseline,
                                ylabel=f"{y} (mean, 95% CI over items)", **labels)  # fmt: skip
    ax = fig.axes[0]
    colours = {drawn.get_label(): drawn.get_color() for drawn in ax.get_lines()}
    numeric = pd.api.types.is_numeric_dtype(frame[x])
    position = {v: float(v) if numeric else float(i) for i, v in enumerate(pd.unique(frame[x]))}  # as layer_curves
    for name, rows in frame.groupby(line, sort=False):
        values = rows[y].astype(float)
        if rows[x].nunique() == 1 and len(values) > 1:
            half = 1.96 * values.std() / len(values) ** 0.5
            ax.errorbar(position[rows[x].iloc[0]], values.mean(), yerr=half, color=colours[str(name)], capsize=3)
    ax.set_ylim(-0.03, 1.03)
    if not numeric:
        ax.margins(x=0.08)
        ax.tick_params(axis="x", labelrotation=30 if len(position) > 4 else 0)
    return fig


def _unablated(results: pd.DataFrame, column: str) -> float:
    return float(results.loc[results[column] == "baseline", _metric(results)].astype(float).mean())


def _metric(results: pd.DataFrame) -> str:
    return "loc_score" if "loc_score" in results else "correct"
