"""Every experiment runs end to end in bf16 (on CPU), on both shipped toys: the library's own
hooks keep the model's dtype (a hook returning another dtype is an error), and the toys' bf16
answers are, but for an occasional one, their fp32 answers."""

from __future__ import annotations

import numpy as np
import pytest

from hooked_vlm import HookedVLM
from hooked_vlm.experiments import (
    attention_knockout,
    cumulative_head_ablation,
    evaluate,
    head_mediation,
    mediation_map,
    object_extension,
    position_probe,
    token_ablation,
    token_shuffle,
)
from hooked_vlm.toy_models import available_toy_models, toy_dataset

TOYS = [name for name in ("toy-llava", "toy-internvl") if name in available_toy_models()]


@pytest.fixture(scope="module", params=TOYS)
def toy(request):
    name = request.param
    return name, HookedVLM.from_pretrained(name, dtype="bfloat16"), toy_dataset(name, 12, split="mechanisms"), toy_dataset(name, 3, split="pairs")


def test_bf16_answers_are_the_fp32_answers(toy):
    name, model, data, _ = toy
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    fp32 = evaluate(HookedVLM.from_pretrained(name), data, "localization", progress=False)
    bf16 = evaluate(model, data, "localization", progress=False)
    assert (fp32["response"] == bf16["response"]).mean() >= 0.9  # of 40 items: toy-llava 40, toy-internvl 38 (same hits)


EXPERIMENTS = {
    "evaluate binary": lambda m, data, pairs: evaluate(m, data, "binary", progress=False),
    "token ablation": lambda m, data, pairs: token_ablation(m, data, strategies=("object", "random", "register", "ig"), paddings=(1,), fractions=(0.15,), seeds=(0,), fill="mean", progress=False),
    "token ablation, noise": lambda m, data, pairs: token_ablation(m, data, strategies=("object",), paddings=(0,), seeds=(0,), fill="noise", progress=False),
    "token shuffle": lambda m, data, pairs: token_shuffle(m, data, seeds=(0,), progress=False),
    "object extension": lambda m, data, pairs: object_extension(m, data, seeds=(0,), progress=False),
    "attention knockout": lambda m, data, pairs: attention_knockout(m, data, group_size=("all", 2), paddings=(0,), seeds=(0,), progress=False),
    "head mediation, exact": lambda m, data, pairs: head_mediation(m, pairs, target="gt", method="exact", progress=False),
    "head mediation, attribution": lambda m, data, pairs: head_mediation(m, pairs, target="gt", method="attribution", progress=False),
    "cumulative head ablation": lambda m, data, pairs: cumulative_head_ablation(
        m, data, {"top": mediation_map(head_mediation(m, pairs, target="gt", progress=False))}, fractions=(0, 0.25), progress=False
    ),
    "position probe": lambda m, data, pairs: position_probe(m, data, pairs, epochs=2, progress=False),
}  # fmt: skip


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_experiment_runs_in_bf16(toy, experiment):
    _, model, data, pairs = toy
    results = EXPERIMENTS[experiment](model, data, pairs)
    assert len(results) > 0
    numbers = results.select_dtypes(["number", "bool"]).astype(float)
    filled = [column for column in numbers if numbers[column].notna().any()]
    assert filled and all(np.isfinite(numbers[column].dropna()).all() for column in filled), experiment
