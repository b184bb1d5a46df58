"""Charts: layer x head heat-maps, layer curves, condition matrices, and saving figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pandas as pd
from jaxtyping import Float
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory
from torch import Tensor

from hooked_vlm.runs.files import write_file_atomically


ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]
BLANK = (0.0, 0.0, 0.0, 0.0)  # colour of NaN cells: fully transparent, the axes background shows
# NaN heads of a head map: light grey under grey hatching, since a blank (white) cell would read
# as 0 on the diverging map, and a head that was not measured is not a head with MF 0
NOT_MEASURED = (0.86, 0.86, 0.86, 1.0)
NOT_MEASURED_NOTE = "hatched: not measured (NaN)"


# ----------------------------------------------------------------------------- saving
def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write `fig` to `path` (format from the suffix, PNG by default) atomically: render into a
    temporary file next to it, then rename over it. A crash or an error mid-save leaves either
    the previous file or nothing, never a truncated image that a later script would trust."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return write_file_atomically(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


# ----------------------------------------------------------------------------- layer x head maps
def head_heatmap(
    values: Float[ArrayLike, "layer head"],
    *,
    title: str | None = None,
    cmap: str | Colormap | None = None,
    signed: bool | None = None,
    annotate_top: int = 0,
    colorbar_label: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A layer x head map (layer 0 at the top), e.g. each head's mean mediation fraction.

    Signed values (`signed=None`: any negative value) get a diverging colormap centred at 0 with
    a symmetric range, so a head's sign reads off its colour; otherwise a sequential one. NaN
    cells (heads not measured, e.g. the last layer's MF at the prompt positions) are grey and
    hatched, with a note under the axis, so they do not read as 0. `annotate_top=k` outlines
    the k largest heads and labels them `L{layer}H{head}`."""
    data = _as_matrix(values, "values")
    finite = np.isfinite(data)
    signed = bool((data[finite] < 0).any()) if signed is None else signed
    fig, ax = _figure_and_axes(ax, figsize=(max(0.18 * data.shape[1] + 2.5, 5.0), max(0.16 * data.shape[0] + 1.5, 3.0)))
    image = _show_matrix(ax, data, cmap or ("RdBu_r" if signed else "viridis"), _value_norm(data, signed), bad=NOT_MEASURED)
    for layer, head in np.argwhere(~finite):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.55", linewidth=0,
                               gid="not-measured"))  # fmt: skip
    ax.set_xlabel("head" if finite.all() else f"head\n{NOT_MEASURED_NOTE}")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for layer, head in top_heads(data, annotate_top):
        cell = Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5, gid="top-head")
        ax.add_patch(cell)
        ax.annotate(
            f"L{layer}H{head}", (head, layer), xytext=(4, 4), textcoords="offset points", fontsize=7,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8),
        )  # fmt: skip
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if title:
        ax.set_title(title)
    return fig


def top_heads(values: Float[ArrayLike, "layer head"], k: int) -> list[tuple[int, int]]:
    """The (layer, head) of the k largest finite values, largest first (the paper ranks heads
    by mean MF, so strongly negative heads are not "top")."""
    data = _as_matrix(values, "values")
    ranked = np.argsort(np.where(np.isfinite(data), data, -np.inf), axis=None, kind="stable")[::-1]
    ranked = [i for i in ranked[: max(k, 0)] if np.isfinite(data.flat[i])]
    return [tuple(int(j) for j in np.unravel_index(i, data.shape)) for i in ranked]



# ----------------------------------------------------------------------------- curves
def layer_curves(
    data: pd.DataFrame | Mapping[str, pd.Series],
    *,
    x: str = "layer",
    y: str = "accuracy",
    condition: str = "condition",
    sd: str | None = None,
    band: Literal["sd", "ci95"] = "sd",
    baseline: float | Mapping[str, float] | None = None,
    sections: Mapping[str, tuple[Any, Any]] | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Accuracy against layer (or layer-group label such as "0–3", or fraction of heads
    removed), one line per condition.

    `data` is a long DataFrame with columns `x`, `y` and optionally `condition` (one line per
    value) and `sd`; or a dict condition -> Series indexed by x. Rows repeated at one (condition,
    x), e.g. one per seed, are averaged and drawn with a band: ±1 sd of the rows (`band="sd"`,
    or the `sd` column if given), or, when the rows are items of a dataset, the 95% confidence
    interval of their mean (`band="ci95"`: ±1.96 sd/√n).
    Numeric x is sorted; labels keep their order of first appearance. `baseline` draws a dashed
    horizontal line (a dict: one per key, coloured like the condition of the same name).
    `sections` names inclusive x ranges, e.g. {"vision": (0, 23), "projector": (24, 24),
    "LM": (25, 56)}, marked with a boundary line and a label."""
    if band not in ("sd", "ci95"):
        raise ValueError(f"band must be 'sd' or 'ci95', got {band!r}")
    table = _long_table(data, x, y, condition, sd)
    summary = table.groupby(["condition", "x"], sort=False).agg(
        mean=("y", "mean"), given=("sd", "mean"), spread=("y", "std"), n=("y", "count")
    )
    if band == "ci95":
        summary["spread"] = 1.96 * summary["spread"] / np.sqrt(summary["n"])
    summary = summary.assign(sd=summary["given"].fillna(summary["spread"])).reset_index()  # a given sd wins
    position = _x_positions(table["x"])
    summary["pos"] = summary["x"].map(position)
    fig, ax = _figure_and_axes(ax, figsize=(6.5, 4.0))
    colours: dict[str, Any] = {}
    for name, line in summary.groupby("condition", sort=False):
        line = line.sort_values("pos")
        (drawn,) = ax.plot(line["pos"], line["mean"], marker="o", markersize=3, label=str(name))
        colours[name] = drawn.get_color()
        if line["sd"].notna().any():
            low, high = line["mean"] - line["sd"].fillna(0), line["mean"] + line["sd"].fillna(0)
            ax.fill_between(line["pos"], low, high, color=drawn.get_color(), alpha=0.2, linewidth=0, gid=f"{band}-band")
    _draw_baselines(ax, baseline, colours)
    _draw_sections(ax, sections, position)
    if not pd.api.types.is_numeric_dtype(table["x"]):
        ax.set_xticks(list(position.values()), [str(v) for v in position], rotation=45 if len(position) > 8 else 0)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def _long_table(
    data: pd.DataFrame | Mapping[str, pd.Series], x: str, y: str, condition: str, sd: str | None
) -> pd.DataFrame:
    """Normalise either input form to columns condition, x, y, sd."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("no curves to draw: the dict is empty")
        parts = [
            pd.DataFrame({"condition": str(name), "x": pd.Series(s).index, "y": pd.Series(s).to_numpy(float)})
            for name, s in data.items()
        ]
        table = pd.concat(parts, ignore_index=True)
        table["sd"] = np.nan
        return table
    missing = [c for c in (x, y, sd) if c is not None and c not in data.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the data (columns: {list(data.columns)})")
    if data.empty:
        raise ValueError("no curves to draw: the DataFrame is empty")
    return pd.DataFrame({
        "condition": data[condition].astype(str) if condition in data.columns else y,
        "x": data[x].to_numpy(),
        "y": data[y].astype(float).to_numpy(),
        "sd": data[sd].astype(float).to_numpy() if sd else np.nan,
    })  # fmt: skip


def _x_positions(xs: pd.Series) -> dict[Any, float]:
    """Where each x value goes: itself if numeric, else its rank of first appearance."""
    if pd.api.types.is_numeric_dtype(xs):
        return {v: float(v) for v in sorted(pd.unique(xs))}
    return {v: float(i) for i, v in enumerate(pd.unique(xs))}


def _draw_baselines(ax: Axes, baseline: float | Mapping[str, float] | None, colours: Mapping[str, Any]) -> None:
    if baseline is None:
        return
    lines = baseline if isinstance(baseline, Mapping) else {"baseline": baseline}
    for name, value in lines.items():
        label = name if name == "baseline" or name not in colours else f"{name} baseline"
        colour = colours.get(name, "0.4")
        ax.axhline(float(value), linestyle="--", linewidth=1, color=colour, label=label, gid="baseline")


def _draw_sections(ax: Axes, sections: Mapping[str, tuple[Any, Any]] | None, position: Mapping[Any, float]) -> None:
    """A dotted line between consecutive sections, each section's name at the top of its span."""
    if not sections:
        return
    spans = []
    for name, (first, last) in sections.items():
        if first not in position or last not in position:
            raise KeyError(f"section {name!r}: x values {first!r}..{last!r} are not among the plotted x values")
        spans.append((name, position[first], position[last]))
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (name, start, end) in enumerate(spans):
        ax.text((start + end) / 2, 0.98, name, transform=top, ha="center", va="top", fontsize=8, color="0.3")
        if i + 1 < len(spans):
            ax.axvline((end + spans[i + 1][1]) / 2, color="0.5", linestyle=":", linewidth=1, gid="section-boundary")



# ----------------------------------------------------------------------------- condition matrices
def matrix_plot(
    df: pd.DataFrame,
    row: str,
    col: str,
    value: str,
    *,
    fmt: str = "{:.1f}",
    cmap: str | Colormap = "viridis",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A small annotated matrix of `value` over two conditions, e.g. localization accuracy by
    padding p (rows) x GT scale s (columns) for object extension. Repeated rows (seeds) are
    averaged; missing combinations are blank."""
    missing = [c for c in (row, col, value) if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the data (columns: {list(df.columns)})")
    table = df.pivot_table(index=row, columns=col, values=value, aggfunc="mean", dropna=False)
    data = table.to_numpy(dtype=float)
    fig, ax = _figure_and_axes(ax, figsize=(1.0 * data.shape[1] + 2.0, 0.8 * data.shape[0] + 1.2))
    image = _show_matrix(ax, data, cmap, _value_norm(data, signed=False))
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            shade = image.cmap(image.norm(v))
            ink = "white" if 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5 else "black"
            ax.text(j, i, fmt.format(v), ha="center", va="center", color=ink, fontsize=9)
    ax.set_xticks(range(data.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(data.shape[0]), [str(r) for r in table.index])
    ax.set_xlabel(col)
    ax.set_ylabel(row)
    fig.colorbar(image, ax=ax, label=value)
    if title:
        ax.set_title(title)
    return fig



# ----------------------------------------------------------------------------- shared helpers
def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure.figure, ax  # .figure of a (sub)figure is the root Figure
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _as_matrix(values: ArrayLike, name: str) -> np.ndarray:
    data = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"{name} must be a [layer, head] matrix, got shape {data.shape}")
    return data.astype(float)


def _value_norm(data: np.ndarray, signed: bool) -> Normalize:
    """Symmetric around 0 for signed data (so white means 0), else the finite range."""
    finite = data[np.isfinite(data)]
    if not len(finite):
        return Normalize(-1.0, 1.0) if signed else Normalize(0.0, 1.0)
    if signed:
        half = float(np.abs(finite).max()) or 1.0
        return Normalize(-half, half)
    return Normalize(float(finite.min()), float(finite.max()))


def _show_matrix(ax: Axes, data: np.ndarray, cmap: str | Colormap, norm: Normalize, bad: tuple = BLANK):
    """imshow with NaN cells masked, drawn in `bad` (default: transparent)."""
    colormap = (colormaps[cmap] if isinstance(cmap, str) else cmap).with_extremes(bad=bad)
    return ax.imshow(np.ma.masked_invalid(data), cmap=colormap, norm=norm, aspect="auto", interpolation="nearest")

