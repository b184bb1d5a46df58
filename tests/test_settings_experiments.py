"""The model's prompt settings reach `prepare` in every experiment, on both toys, without a
parameter of their own: a spy on the family's `prepare` sees the paper's settings in every call."""

from __future__ import annotations

import warnings

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.data.coco import load_coco
from hooked_vlm.data.control_set import build_control_set
from hooked_vlm.experiments import (
    attention_knockout, cumulative_head_ablation, evaluate, head_mediation, object_extension, position_probe,
    token_ablation, token_shuffle,
)  # fmt: skip
from hooked_vlm.prompt_settings import paper_settings
from hooked_vlm.toy_models import toy_dataset

TOYS = ("toy-llava", "toy-internvl")
PAPER = {"toy-llava": {"image_mode": "pad", "template": "vicuna_v1"}, "toy-internvl": {"max_tiles": 6, "template": "internvl2_5"}}
NO_FILTERS = dict(min_area=0, max_area=1, min_short_side=0)


def _ranking(model):
    return torch.arange(model.cfg.n_layers * model.cfg.n_heads, dtype=torch.float32).view(model.cfg.n_layers, -1)


EXPERIMENTS = {
    "evaluate": lambda m, d: evaluate(m, d, "list", progress=False),
    "token ablation, IG and the mean embedding": lambda m, d: token_ablation(
        m, d, strategies=("object", "ig"), paddings=(0,), fractions=(0.25,), seeds=(0,), fill="mean", ig_steps=2,
        ig_baseline="mean", progress=False
    ),
    "token shuffle": lambda m, d: token_shuffle(m, d, seeds=(0,), progress=False),
    "object extension": lambda m, d: object_extension(m, d, paddings=(1,), gt_scales=(0,), seeds=(0,), progress=False),
    "attention knockout": lambda m, d: attention_knockout(m, d, group_size="all", paddings=(0,), progress=False),
    "head mediation": lambda m, d: head_mediation(m, d, target="gt", method="attribution", progress=False),
    "cumulative head ablation": lambda m, d: cumulative_head_ablation(
        m, d, {"by_index": _ranking(m)}, task="list", fractions=(0, 0.5), low_importance_from="by_index", progress=False
    ),
    "position probe": lambda m, d: position_probe(m, d, d, epochs=1, tokens_per_image=4, progress=False),
    "mean embedding": lambda m, d: iv.compute_mean_embedding(m, [item.image for item in d], progress=False),
}  # fmt: skip


@pytest.fixture(scope="module", params=TOYS)
def toy(request):
    model = HookedVLM.from_pretrained(request.param)
    model.use_settings(paper_settings(model))
    return request.param, model, toy_dataset(request.param, 2, seed=0)



@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_the_paper_settings_reach_prepare_in_every_experiment(toy, experiment, prepare_spy):
    name, model, data = toy
    seen = prepare_spy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # token ablation's mean over the dataset's own images warns so
        EXPERIMENTS[experiment](model, data)
    assert seen, f"{experiment} never called prepare"
    assert all({k: kwargs.get(k) for k in PAPER[name]} == PAPER[name] for kwargs in seen)


def test_the_paper_settings_reach_prepare_in_the_control_set(toy, prepare_spy, tmp_path):
    name, model, data = toy
    path = data.export_coco(tmp_path)
    subset = load_coco(path, tmp_path / "images", **NO_FILTERS)
    seen = prepare_spy(model)
    control = build_control_set([model], subset, tmp_path / "removed", progress=False)
    assert seen and all({k: kwargs.get(k) for k in PAPER[name]} == PAPER[name] for kwargs in seen)
    assert control.manifest["models"][0]["prompt_settings"] == PAPER[name]
