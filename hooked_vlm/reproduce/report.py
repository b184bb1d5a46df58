"""The reproduction's report: one markdown file and one CSV per part, the paper's published
numbers beside ours for every model.

    out/report.md       every part: a table (paper columns, then ours), the paper's findings, our figures
    out/<part>.csv      long format: part, row, task, model, source ("paper" or "ours"), value, sd, n
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from hooked_vlm.reproduce import paper
from hooked_vlm.runs import write_atomically

COLUMNS = ["part", "row", "task", "model", "source", "value", "sd", "n"]


def combined(ours: pd.DataFrame, part: str) -> pd.DataFrame:
    """The part's published numbers and ours in one long table."""
    published = paper.published()
    published = published[published.part == part].assign(source="paper", sd=float("nan"), n=pd.NA)
    mine = ours[ours.part == part].assign(source="ours")
    return pd.concat([published[COLUMNS], mine[COLUMNS]], ignore_index=True)


def wide(table: pd.DataFrame, models: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows (row, task) in the paper's order then ours; one column per paper model ("paper: M"),
    then one per our model ("ours: M", with ± sd over seeds where there are several seeds)."""
    def cell(group: pd.DataFrame) -> str:
        value, sd = group["value"].iloc[0], group["sd"].iloc[0]
        if pd.isna(value):
            return ""
        return f"{value:.2f}" + (f" ± {sd:.2f}" if pd.notna(sd) else "")

    table = table.assign(column=[f"{s}: {m}" for s, m in zip(table["source"], table["model"])])
    cells = table.groupby(["row", "task", "column"], sort=False).apply(cell, include_groups=False)
    grid = cells.unstack("column")
    order = [f"paper: {m}" for m in paper.MODELS] + [f"ours: {m['name']}" for m in models]
    return grid.reindex(columns=[c for c in order if c in grid.columns]).fillna("").reset_index()


def write_report(out: Path, ours: pd.DataFrame, models: list[dict[str, Any]], parts: list[str], data: dict[str, Any]) -> Path:
    """report.md and one CSV per part in `out`, each written atomically. `models`: per model its
    name, folder, paper name (or None) and prompt settings; `data`: what the runs read."""
    lines = ["# Reproducing \"Mechanisms of Object Localization in Vision-Language Models\"", ""]
    lines += ["Values are percentages (localization: the mean of the success rates at IoU > 0.5, 0.7, 0.9; list: "
              "accuracy), ours ± sd over seeds where the paper used several. Paper columns are the published numbers "
              "(`hooked_vlm.reproduce.paper`).", ""]  # fmt: skip
    lines += ["## Models and settings", "", "| model | paper's name | prompt settings |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['paper'] or '(not in the paper)'} | {m['settings_label']}: {m['settings']} |" for m in models]
    lines += ["", "Data: " + ", ".join(f"{k} = {v}" for k, v in data.items() if v is not None), ""]
    for part in parts:
        table = combined(ours, part)
        write_atomically(out / f"{part}.csv", lambda path: table.to_csv(path, index=False))
        lines += [f"## {part}: {paper.SOURCES[part]}", ""]
        if part in paper.FINDINGS:
            lines += [f"The paper: {paper.FINDINGS[part]}", ""]
        if table.empty:
            lines += ["(no numbers: the part applies to none of the models, e.g. table3 to InternVL only)", ""]
        else:
            lines += [wide(table, models).to_markdown(index=False, disable_numparse=True), ""]
        for m in models:
            for figure in sorted((out / m["folder"] / part).glob("*.png")):
                lines.append(f"![{m['name']} {part} {figure.stem}]({figure.relative_to(out).as_posix()})")
        lines.append("")
    path = out / "report.md"
    text = "\n".join(lines)
    write_atomically(path, lambda p: Path(p).write_text(text))
    return path
