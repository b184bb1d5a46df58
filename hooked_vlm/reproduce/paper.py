"""The published numbers of "Mechanisms of Object Localization in Vision-Language Models"
(Schaumlöffel, Vilas, Roig, CVPR 2026; arXiv 2605.19792), as data, each with its source.

`PUBLISHED` rows: (part, row, task, paper model, value in %, source). `FINDINGS`: what the paper
states without a number (the figures), per part. Source: the paper's full text as summarised in
PAPER_PROTOCOL §1.4-§1.10 of the project's reference notes.
"""

from __future__ import annotations

import re

import pandas as pd

MODELS = ("LLaVA-1.5-7B", "LLaVA-1.5-13B", "InternVL3.5-8B")
TASKS = ("localization", "list")  # the paper's localization score and list-classification accuracy

# Table 1 (token ablation, §1.4): localization % / classification %, LLaVA-7B, LLaVA-13B, InternVL
_TABLE1 = {
    "baseline": ((35.34, 58.10), (46.98, 65.30), (72.64, 83.30)),
    "object": ((5.92, 19.44), (7.37, 31.41), (11.27, 33.19)),
    "object +1": ((0.73, 11.25), (0.59, 15.12), (3.77, 23.71)),
    "object +2": ((0.34, 10.59), (0.28, 12.54), (2.02, 20.73)),
    "object -1": ((31.73, 55.29), (43.74, 65.48), (72.35, 81.85)),
    "IG 8%": ((15.84, 43.95), (13.09, 49.24), (30.13, 74.69)),
    "random 8%": ((35.09, 56.58), (45.25, 63.89), (71.71, 83.10)),
    "register": ((35.07, 59.48), (46.53, 64.95), (72.64, 83.41)),
}
# Table 2 (token shuffle at the LLM input, 3 seeds, §1.5): localization only in the text
_TABLE2 = {"full shuffle": (1.90, 0.30, 4.70), "object shuffle": (35.30, 45.20, 37.70)}
# Table 3 (InternVL3.5-8B, one view ablated, §1.6): localization / classification (None: not given)
_TABLE3 = {
    "global object": (36.20, 73.80),
    "global object +1": (25.86, None),
    "local object": (62.93, 76.65),
    "local object +1": (63.20, None),
}
SOURCES = {
    "baseline": "Table 1, baseline row",
    "table1": "Table 1 (token ablation; object ≈8% of tokens)",
    "table2": "Table 2 (token shuffle, 3 seeds)",
    "table3": "Table 3 (InternVL global vs local views)",
    "figure1": "Figure 1 (object extension, 10 seeds; LLaVA-13B in appendix Figure 8)",
    "figure3": "Figure 3 (attention knockout, groups of 4 layers; appendix Figure 12)",
    "figures4-5": "Figures 4-5 (causal mediation, 50 pairs; cumulative head ablation; appendix Figures 13-15)",
}
FINDINGS = {
    "figure1": "The diagonal is strongest for every model: boxes predicted with p rings of extension match the ground "
    "truth grown by p token widths best.",
    "figure3": "LLaVA is most sensitive to knockout in early-mid layers, InternVL in mid-late layers; both tasks share "
    "the early layers and localization needs further layers; knocking out all layers is strongest.",
    "figures4-5": "Non-zero mediation clusters in layers 11-16 (LLaVA) and 16-22 (InternVL). Top-10 heads shared by "
    "the two tasks: 2 (LLaVA), 1 (InternVL); top-50: 20 (LLaVA-7B), 15 (LLaVA-13B), 18 (InternVL). Removing "
    "localization- or classification-critical heads lowers localization far more than low-importance heads "
    "(normalised AUC only in the figure).",
}
# Figures 4-5: numbers stated in the text
MEDIATION = {
    "top-10 overlap": (2, 2, 1),  # "2 (LLaVA) and 1 (InternVL)"
    "top-50 overlap": (20, 15, 18),
}


def published() -> pd.DataFrame:
    """Every published number: part, row, task, model, value (%), source."""
    rows = []
    for row, values in _TABLE1.items():
        part = "baseline" if row == "baseline" else "table1"
        for model, pair in zip(MODELS, values):
            rows += [(part, row, task, model, value) for task, value in zip(TASKS, pair)]
    for row, values in _TABLE2.items():
        rows += [("table2", row, "localization", model, value) for model, value in zip(MODELS, values)]
    for row, pair in _TABLE3.items():
        rows += [("table3", row, task, "InternVL3.5-8B", value) for task, value in zip(TASKS, pair) if value is not None]
    for row, values in MEDIATION.items():
        rows += [("figures4-5", row, "localization vs binary", model, value) for model, value in zip(MODELS, values)]
    table = pd.DataFrame(rows, columns=["part", "row", "task", "model", "value"])
    table["source"] = table["part"].map(SOURCES)
    return table


def paper_model(name: str) -> str | None:
    """The paper's name of a checkpoint (a hub id or a path), or None for a model it does not report."""
    text = str(name).lower()
    if re.search(r"llava[-_]?(v)?1\.?5[-_]7b", text):
        return "LLaVA-1.5-7B"
    if re.search(r"llava[-_]?(v)?1\.?5[-_]13b", text):
        return "LLaVA-1.5-13B"
    if re.search(r"internvl3[-_.]?5[-_]8b", text):
        return "InternVL3.5-8B"
    return None
