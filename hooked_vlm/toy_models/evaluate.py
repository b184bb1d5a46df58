"""Held-out quality of a toy model: the paper's three tasks, greedy decoding, the library's scoring.

For each synthetic item: localization of the target (parsed with `hooked_vlm.boxes.parse_box`,
success at IoU > 0.5 / 0.7 / 0.9 and their mean, `hooked_vlm.scoring`), list classification on
the image (correct when the target's class name appears) and on its object-removed twin (the
rate at which the removed target is still named), and binary yes/no on the image (Yes), on the
removed twin (No) and for an absent class (No).

Two ways to decode, so that the numbers can be compared: `hf_generate` (the checkpoint read by
transformers, inputs from its saved processor, `model.generate`) and `hooked_generate`
(`HookedVLM.prepare` + `HookedVLM.generate`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from hooked_vlm import HookedVLM
from hooked_vlm.data import prompts
from hooked_vlm.data.synthetic import SyntheticItem, absent_in_target_colour
from hooked_vlm.families import internvl as internvl_family
from hooked_vlm.families import llava as llava_family
from hooked_vlm.scoring import (
    binary_answer,
    classification_correct,
    score_localization_answer,
    summarize_binary,
    summarize_localization,
)
from hooked_vlm.testing import load_hf_processor
from hooked_vlm.toy_models import toy_dataset, toy_model_path

# Longest answers: InternVL's `<ref>c s</ref><box>[[a, b, c, d]]</box>` is ~30 tokens, a list of
# four classes ~16.
MAX_NEW_TOKENS = 40
Generate = Callable[[Sequence[Image.Image], Sequence[str]], list[str]]


def hf_generate(model: Any, processor: Any, family: str, batch_size: int = 16) -> Generate:
    """Greedy decoding with Hugging Face: inputs from the checkpoint's processor (left padding),
    prompts rendered by the family's template, special tokens skipped in the decoded text."""
    render = llava_family.render_prompt if family == "llava" else internvl_family.render_prompt
    processor.tokenizer.padding_side = "left"

    @torch.no_grad()
    def generate(images: Sequence[Image.Image], user_prompts: Sequence[str]) -> list[str]:
        texts = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            rendered = [render(p, "hf") for p in user_prompts[chunk]]
            inputs = processor(images=list(images[chunk]), text=rendered, return_tensors="pt", padding=True)
            inputs.pop("image_sizes", None)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            texts += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts

    return generate


def hooked_generate(model: Any, batch_size: int = 16) -> Generate:
    """Greedy decoding with `HookedVLM.prepare` + `HookedVLM.generate`."""

    def generate(images: Sequence[Image.Image], user_prompts: Sequence[str]) -> list[str]:
        texts = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            inputs = model.prepare(list(images[chunk]), list(user_prompts[chunk]))
            texts += model.generate(inputs, max_new_tokens=MAX_NEW_TOKENS)
        return texts

    return generate


def evaluate(
    generate: Generate,
    items: Sequence[SyntheticItem],
    family: str,
    tasks: Sequence[str] = ("localization", "list", "binary"),
    shapes: Sequence[str] = (),
) -> dict[str, Any]:
    """Run `tasks` on `items` and summarise. Returns the metrics (fractions in [0, 1]) and, under
    "answers", the raw localization answers (for inspection). `shapes`: the dataset's shapes,
    for the binary shape negatives (none without them)."""
    items = list(items)
    metrics: dict[str, Any] = {"n_items": len(items)}
    if "localization" in tasks:
        metrics |= _localization(generate, items, family)
    if "list" in tasks:
        metrics |= _list_classification(generate, items)
    if "binary" in tasks:
        metrics |= _binary(generate, items, shapes)
    return metrics


def _localization(generate: Generate, items: list[SyntheticItem], family: str) -> dict[str, Any]:
    texts = generate([i.image for i in items], [prompts.localization_prompt(i.class_name) for i in items])
    rows = [score_localization_answer(t, i.box, i.image_size, family=family) for t, i in zip(texts, items)]
    table = pd.DataFrame(rows)
    summary = summarize_localization(table).iloc[0]
    out = {f"loc_{key}": float(summary[key]) for key in ("parsed", "success@0.5", "success@0.7", "success@0.9")}
    out["loc_score"] = float(summary["loc_score"])
    out["mean_iou"] = float(table["iou"].fillna(0).mean())
    out["answers"] = texts
    return out


def _list_classification(generate: Generate, items: list[SyntheticItem]) -> dict[str, float]:
    """Accuracy on the images, and how often the removed twin still gets the target named."""
    n = len(items)
    images = [i.image for i in items] + [i.removed_image for i in items]
    texts = generate(images, [prompts.list_prompt(i.list_choices) for i in items] * 2)
    named = [classification_correct(t, i.class_name) for t, i in zip(texts, items + items)]
    return {"list_accuracy": sum(named[:n]) / n, "list_removed_named_rate": sum(named[n:]) / n}


def _binary(generate: Generate, items: list[SyntheticItem], shapes: Sequence[str]) -> dict[str, float]:
    """Yes on the image, No on the removed twin, No for an absent class sharing colour or shape
    (these three make `binary_accuracy`). Reported apart, the one negative colour alone cannot
    answer: the target's colour in another shape absent from the image
    (`binary_shape_negative_accuracy`, over the items where such a class exists; needs the
    dataset's `shapes`)."""
    cases = [(i.image, i.class_name, True) for i in items]
    cases += [(i.removed_image, i.class_name, False) for i in items]
    cases += [(i.image, i.absent_class, False) for i in items if i.absent_class]
    shape_negatives = [(i.image, others[0], False) for i in items if (others := absent_in_target_colour(i, shapes))]
    texts = generate([c[0] for c in cases + shape_negatives], [prompts.binary_prompt(c[1]) for c in cases + shape_negatives])
    answers = [binary_answer(t) for t in texts]
    table = pd.DataFrame({"answer": answers[: len(cases)], "present": [c[2] for c in cases]})
    summary = summarize_binary(table).iloc[0]
    said_no = [a is False for a in answers[len(cases) :]]
    out = {"binary_accuracy": float(summary["accuracy"]), "binary_false_positive_rate": float(summary["false_positive_rate"])}
    if said_no:
        out["binary_shape_negative_accuracy"] = sum(said_no) / len(said_no)
    return out


def evaluate_shipped(name: str, decoder: str = "hooked", n_items: int = 150, split: str = "val") -> dict[str, Any]:
    """Held-out metrics of a shipped (or any saved) toy checkpoint, with either decoder. The
    items are those of `training.json`'s data spec and seed, from `split`."""
    path = toy_model_path(name) or Path(name)
    record = json.loads((path / "training.json").read_text())
    family = record["family"]
    items = list(toy_dataset(path, n_items, seed=record["seed"], split=split))  # the distribution it was trained on
    if decoder == "hooked":
        generate = hooked_generate(HookedVLM.from_pretrained(str(path)))
    else:
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        generate = hf_generate(model, load_hf_processor(path), family)
    metrics = evaluate(generate, items, family, shapes=record["spec"]["data"]["shapes"])
    metrics.pop("answers", None)
    return {"name": name, "decoder": decoder, "split": split, **metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Held-out metrics of a toy checkpoint")
    parser.add_argument("name", help="a shipped toy name (toy-llava, toy-internvl) or a checkpoint directory")
    parser.add_argument("--decoder", choices=("hooked", "hf"), default="hooked")
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--split", default="val")
    parser.add_argument("--record", action="store_true", help="store the result in the checkpoint's training.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    metrics = evaluate_shipped(args.name, args.decoder, args.items, args.split)
    if args.record:
        record_metrics(toy_model_path(args.name) or Path(args.name), metrics)
    print(json.dumps(metrics, indent=2))


def record_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Add `metrics` to `training.json` under `heldout_{decoder}` (e.g. `heldout_hooked`)."""
    file = path / "training.json"
    record = json.loads(file.read_text())
    record[f"heldout_{metrics['decoder']}"] = metrics
    file.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
