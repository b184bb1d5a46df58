"""The demo: the whole library at work on a shipped toy model, offline, in a few minutes.

It loads a toy model, predicts a box, then runs three of the paper's experiments on held-out
synthetic images (token ablation, attention knockout, head mediation) and writes a short report
(`report.md`, `report.json`) and figures (PNG) to an output folder. Every number in the report
comes from this run. The ablation value, the mean visual embedding (the paper's is over
ImageNet-val), is averaged over images of the toy's own distribution from a split of their own
("mean"), so it shares no image with the evaluated ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from hooked_vlm import interventions as iv
from hooked_vlm.boxes import parse_box, iou
from hooked_vlm.data.prompts import localization_prompt
from hooked_vlm.experiments import (
    attention_knockout,
    evaluate,
    head_mediation,
    mediation_map,
    rank_heads,
    summarize,
    token_ablation,
)
from hooked_vlm.experiments.data import as_samples
from hooked_vlm.experiments.evaluate import box_format
from hooked_vlm.model import HookedVLM
from hooked_vlm.toy_models import MEAN_IMAGES, toy_dataset, toy_mean_embedding


def run_demo(
    model_name: str = "toy-llava",
    out: str | Path = "demo_output",
    *,
    n_items: int = 40,
    n_pairs: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return the report (also written to `out`)."""
    from hooked_vlm import plotting

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = HookedVLM.from_pretrained(model_name)
    data = toy_dataset(model_name, n_items, seed=seed, split="test")
    report: dict[str, Any] = {"model": model_name, "family": model.cfg.family, "n_items": n_items, "n_pairs": n_pairs}
    figures: dict[str, str] = {}

    # 1. one prediction, drawn over the image with the object's tokens
    sample = next(iter(as_samples(data)))
    inputs = model.prepare(sample.image, localization_prompt(sample.class_name))
    tokens = model.generate(inputs, max_new_tokens=40, return_tokens=True)[0]
    answer = model.tokenizer.decode(tokens, skip_special_tokens=True)  # as the experiments score it
    predicted = parse_box(answer, sample.image_size, **box_format(model))
    report["example"] = {
        "class_name": sample.class_name,
        "answer": _as_written(model.tokenizer, tokens),
        "gt_box": [round(v, 1) for v in sample.box],
        "predicted_box": None if predicted is None else [round(v, 1) for v in predicted],
        "iou": None if predicted is None else round(iou(predicted, sample.box), 3),
    }
    object_positions = iv.object_tokens(inputs, sample.mask).positions(0)
    boxes = {"ground truth": sample.box} | ({"predicted": predicted} if predicted else {})
    figure = plotting.token_overlay(sample.image, inputs.layout, positions=object_positions, box=boxes, alpha=0.3,
                                    title=f"{sample.class_name}\nits tokens (red), ground-truth and predicted box")  # fmt: skip
    figures["prediction"] = _save(plotting, figure, out / "prediction.png")

    # 2. baselines
    localization = evaluate(model, data, "localization", progress=progress)
    classification = evaluate(model, data, "list", progress=progress)
    report["baseline"] = {
        "localization_score": _score(summarize(localization), "loc_score"),
        "success@0.5": _score(summarize(localization), "success@0.5"),
        "list_accuracy": _score(summarize(classification), "accuracy"),
    }

    # 3. token ablation: the object's tokens against as many random tokens
    mean = toy_mean_embedding(model, model_name, seed=seed, progress=progress)
    ablation = token_ablation(model, data, strategies=("object", "random"), paddings=(0, 1), fractions=(_object_share(model, data),),
                              mean=mean, seeds=(seed,), progress=progress)  # fmt: skip
    by_condition = summarize(ablation)["loc_score"]
    report["mean_embedding"] = {"split": "mean", "images": MEAN_IMAGES, "image_tokens": mean.count}
    report["token_ablation"] = {name: round(float(score), 3) for name, score in by_condition.items()}

    # 4. attention knockout: from every token after the image to the object, by layer
    knockout = attention_knockout(model, data, group_size=(1, "all"), paddings=(1,), seeds=(seed,), progress=progress)
    curve = knockout[knockout.target != "baseline"].groupby(["target", "layers"], sort=False)["loc_score"].mean()
    report["attention_knockout"] = {f"{target} {layers}": round(float(v), 3) for (target, layers), v in curve.items()}
    curve_frame = knockout[knockout.target != "baseline"].drop(columns="condition").rename(columns={"target": "condition"})
    figure = plotting.layer_curves(curve_frame, x="layers", y="loc_score", band="ci95",  # rows are items
                                   baseline=report["baseline"]["localization_score"],
                                   title="Attention knockout (after-image tokens -> object tokens, +1 ring)",
                                   xlabel="layers knocked out", ylabel="localization score (mean, 95% CI)")  # fmt: skip
    figures["attention_knockout"] = _save(plotting, figure, out / "attention_knockout.png")

    # 5. head mediation on object-present / object-removed pairs
    pairs = toy_dataset(model_name, n_pairs, seed=seed + 1, split="test")
    mediation = head_mediation(model, pairs, target="gt", progress=progress)
    mf = mediation_map(mediation)
    report["head_mediation"] = {
        "pairs": n_pairs,
        "shape": list(mf.shape),  # [layers, heads]
        "top_heads": [{"layer": l, "head": h, "mean_mf": round(float(mf[l, h]), 3)} for l, h in rank_heads(mf, 5)],
        "not_measured": [{"layer": int(l), "head": int(h)} for l, h in mf.isnan().nonzero().tolist()],
    }
    figure = plotting.head_heatmap(mf, title="Mean mediation fraction per head\n(localization)", annotate_top=5)
    figures["head_mediation"] = _save(plotting, figure, out / "head_mediation.png")

    report["figures"] = figures
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    localization.assign(experiment="baseline").to_csv(out / "baseline_localization.csv", index=False)
    ablation.to_csv(out / "token_ablation.csv", index=False)
    knockout.to_csv(out / "attention_knockout.csv", index=False)
    mediation.to_csv(out / "head_mediation.csv", index=False)
    return report


def render_report(report: dict[str, Any]) -> str:
    example, base = report["example"], report["baseline"]
    lines = [
        f"# hooked_vlm demo: {report['model']} ({report['family']})",
        "",
        f"Held-out synthetic images: {report['n_items']}; source/base pairs for mediation: {report['n_pairs']}.",
        "",
        "## One prediction",
        f"Query: the {example['class_name']}. Answer: {example['answer']!r}. GT box {example['gt_box']}, "
        f"predicted {example['predicted_box']}, IoU {example['iou']}. ![prediction](prediction.png)",
        "",
        "## Baseline",
        f"Localization score (mean success at IoU 0.5/0.7/0.9): {base['localization_score']:.3f}; "
        f"success at IoU 0.5: {base['success@0.5']:.3f}; list classification accuracy: {base['list_accuracy']:.3f}.",
        "",
        "## Token ablation (mean embedding at the LM input)",
        f"The mean of {report['mean_embedding']['image_tokens']} image tokens of {report['mean_embedding']['images']} "
        f"images of the toy's distribution (split {report['mean_embedding']['split']!r}: none of the images above).",
        *[f"- {name}: localization score {score:.3f}" for name, score in report["token_ablation"].items()],
        "",
        "## Attention knockout (after-image tokens -> object tokens + 1 ring)",
        *[f"- {name}: localization score {score:.3f}" for name, score in report["attention_knockout"].items()],
        "![knockout](attention_knockout.png)",
        "",
        "## Head mediation (mean MF over pairs)",
        "Each head patched at the prompt positions after the image. " + _not_measured_text(report["head_mediation"]),
        "Top heads:",
        *[f"- L{h['layer']}H{h['head']}: {h['mean_mf']:.3f}" for h in report["head_mediation"]["top_heads"]],
        "![mediation](head_mediation.png)",
        "",
    ]
    return "\n".join(lines)


def _not_measured_text(mediation: dict[str, Any]) -> str:
    """Which heads have no MF, and why: the last layer's cannot reach the scored digits from the
    prompt positions (see `head_mediation`); any other NaN head had no pair with an effect."""
    heads, (n_layers, n_heads) = mediation["not_measured"], mediation["shape"]
    if not heads:
        return "Every head was measured."
    last = [h for h in heads if h["layer"] == n_layers - 1]
    text = ""
    if len(last) == n_heads:
        text = (f"The {n_heads} heads of the last layer (L{n_layers - 1}) are not measured: a last-layer head's output at "
                "those positions reaches only their own logits, never the answer's digits, so patching it cannot change "
                "the score. ")  # fmt: skip
    others = len(heads) - (len(last) if text else 0)
    if others:
        text += f"{others} heads are not measured on any pair (no pair's source and base perplexities differ enough). "
    return text + "Unmeasured heads have no MF (NaN, hatched in the map) and are not ranked."


def _as_written(tokenizer, tokens) -> str:
    """An answer with its special tokens (InternVL's `<ref>`/`<box>` tags), up to the end of sequence."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return (text.split(tokenizer.eos_token)[0] if tokenizer.eos_token else text).strip()


def _object_share(model, data) -> float:
    """The mean share of image tokens the objects cover, so the random control matches their size."""
    shares = []
    for sample in as_samples(data):
        inputs = model.prepare(sample.image, "x")
        shares.append(iv.object_tokens(inputs, sample.mask).count() / len(inputs.layout))
    return round(float(sum(shares) / len(shares)), 4)


def _score(summary: pd.DataFrame, column: str) -> float:
    return round(float(summary[column].iloc[0]), 4)


def _save(plotting, figure, path: Path) -> str:
    plotting.save_figure(figure, path)
    return path.name
