"""The control set (PAPER_PROTOCOL §1.2) on the toy models: per-model verdicts read off
`evaluate`'s rows, the intersection over models, the manifest, and `--pairs`."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace

import pandas as pd
import pytest

from hooked_vlm.cli import main
from hooked_vlm.data.coco import load_coco, pair_with_removed
from hooked_vlm.data.control_set import build_control_set, control_set_dataset, load_control_set
from hooked_vlm.experiments import as_samples, evaluate
from hooked_vlm.model import HookedVLM
from hooked_vlm.toy_models import toy_dataset

MODELS = ("toy-llava", "toy-internvl")
NO_FILTERS = dict(min_area=0, max_area=1, min_short_side=0)
STILL_THERE = 4  # this annotation's "twin" is a copy of its original: the object was not removed


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The synthetic COCO export of 16 scenes of the toys' distribution, with their rendered
    object-removed twins (distractors have none); annotation 4's twin still shows the object."""
    out = tmp_path_factory.mktemp("synthetic_coco")
    path = toy_dataset("toy-llava", 16, seed=0, split="control-set").export_coco(out)
    subset = load_coco(path, out / "images", **NO_FILTERS)
    original = next(item for item in subset if item.annotation_id == STILL_THERE).image_path
    shutil.copy(original, out / "removed" / f"{STILL_THERE}.png")
    return path, out


@pytest.fixture(scope="module")
def subset(export):
    path, out = export
    return load_coco(path, out / "images", **NO_FILTERS)


@pytest.fixture(scope="module")
def control(subset, export, tmp_path_factory):
    out = tmp_path_factory.mktemp("control") / "control.json"
    return build_control_set(list(MODELS), subset, export[1] / "removed", out=out, progress=False)


@pytest.fixture(scope="module")
def recomputed(subset, export):
    """Per model: {annotation id: (named in the original, named in the twin)} from evaluate's own rows."""
    pairs = pair_with_removed(subset, export[1] / "removed")
    verdicts = {}
    for name in MODELS:
        model = HookedVLM.from_pretrained(name)
        original = evaluate(model, pairs, "list", progress=False)
        twins = [replace(sample, image=sample.removed_image) for sample in as_samples(pairs)]
        removed = evaluate(model, twins, "list", progress=False)
        ids = [pair.item.annotation_id for pair in pairs]
        verdicts[name] = {a: (o, r) for a, o, r in zip(ids, original["correct"], removed["correct"])}
    return verdicts


def test_each_models_verdicts_are_evaluates(control, recomputed):
    table = control.verdicts()
    for name in MODELS:
        mine = table[table.model == name].set_index("annotation_id")
        for ann, (original, removed) in recomputed[name].items():
            assert (mine.loc[ann, "original_recognised"], mine.loc[ann, "removed_recognised"]) == (original, removed)
            assert mine.loc[ann, "model_kept"] == (original and not removed)


def test_the_control_set_is_the_intersection_over_the_models(control, recomputed):
    kept = [{a for a, (o, r) in recomputed[name].items() if o and not r} for name in MODELS]
    assert set(control.kept_annotation_ids) == kept[0] & kept[1]
    assert kept[0] != kept[1]  # the models disagree somewhere: the intersection is not one model's set
    assert control.manifest["counts"]["kept"] == len(kept[0] & kept[1])


def test_the_manifest_says_why_each_pair_was_dropped(control, subset):
    pairs = {p["annotation_id"]: p for p in control.manifest["pairs"]}
    assert [p["annotation_id"] for p in control.manifest["pairs"]] == [item.annotation_id for item in subset]
    assert pairs[STILL_THERE]["reason"] == "toy-llava: still recognised without the object; toy-internvl: still recognised without the object"
    distractors = [item.annotation_id for item in subset if item.annotation_id not in pairs or pairs[item.annotation_id]["removed_image"] is None]
    assert distractors and all(pairs[a]["reason"] == "no object-removed image" and not pairs[a]["verdicts"] for a in distractors)
    dropped = [p for p in control.manifest["pairs"] if not p["kept"]]
    assert all(p["reason"] for p in dropped) and not any(p["reason"] for p in control.manifest["pairs"] if p["kept"])


def test_the_manifest_records_the_models_and_arguments(control):
    manifest = json.loads(control.path.read_text())
    assert [m["name"] for m in manifest["models"]] == list(MODELS)
    llava = manifest["models"][0]
    assert llava["family"] == "llava" and llava["dtype"] == "float32" and llava["preprocessing"]["image_mode"] == "pad"
    assert len(llava["weights_sample"]) == 16 and llava["counts"]["kept"] + llava["counts"]["missed_in_original"] + llava["counts"]["recognised_without_object"] == 16
    assert manifest["arguments"]["task"] == "list" and manifest["arguments"]["max_new_tokens"] == 128
    assert not control.path.with_name("control.json.partial.json").exists()


def test_select_gives_the_kept_pairs_in_the_manifests_order(control, subset, export):
    pairs = pair_with_removed(subset, export[1] / "removed")
    selected = load_control_set(control.path).select(list(reversed(pairs)))
    assert [p.item.annotation_id for p in selected] == control.kept_annotation_ids
    with pytest.raises(ValueError, match="are not in the data"):
        control.select(pairs[:3])


def test_select_refuses_another_annotation_file(control, subset):
    other = [replace(item, class_name="red star") for item in subset]
    with pytest.raises(ValueError, match="another annotation file"):
        control.select(other)


def test_the_binary_rule_keeps_a_yes_on_the_original_and_a_no_on_the_twin(subset, export):
    model = HookedVLM.from_pretrained("toy-llava")
    control = build_control_set([model], subset[:6], export[1] / "removed", task="binary", progress=False)
    rows = evaluate(model, pair_with_removed(subset[:6], export[1] / "removed"), "binary", progress=False)
    yes = rows.groupby(["sample_id", "image"])["answer"].first().map(lambda a: a is True)
    for pair in control.manifest["pairs"]:
        if pair["removed_image"] is not None:
            sid = f"coco-{pair['annotation_id']}"
            assert pair["kept"] == (yes[sid, "original"] and not yes[sid, "removed"])


def test_preprocessing_reaches_prepare_and_is_recorded(subset, export, monkeypatch):
    model = HookedVLM.from_pretrained("toy-llava")
    seen = []
    prepare = model.prepare
    monkeypatch.setattr(model, "prepare", lambda *a, **k: seen.append(model.preprocessing.image_mode) or prepare(*a, **k))
    control = build_control_set([model], subset[:4], export[1] / "removed", preprocessing={"image_mode": "crop"}, progress=False)
    assert seen and set(seen) == {"crop"} and model.preprocessing.image_mode == "pad"  # restored
    assert control.manifest["models"][0]["preprocessing"]["image_mode"] == "crop"
    assert control.manifest["models"][0]["prompt_settings"]["image_mode"] == "crop"  # not the checkpoint's "pad"
    with pytest.raises(ValueError, match="llava preprocessing has no setting max_tiles"):
        build_control_set([model], subset[:4], export[1] / "removed", preprocessing={"max_tiles": 6}, progress=False)


def test_a_rerun_after_a_crash_starts_at_the_model_it_was_on(subset, export, tmp_path, monkeypatch):
    out = tmp_path / "control.json"
    with pytest.raises(FileNotFoundError, match="no-such-model"):  # the second model fails to load
        build_control_set(["toy-llava", str(tmp_path / "no-such-model")], subset[:4], export[1] / "removed", out=out, progress=False)
    assert "toy-llava" in out.with_name("control.json.partial.json").read_text()
    calls = []
    monkeypatch.setattr(sys.modules["hooked_vlm.experiments.evaluate"], "evaluate", lambda *a, **k: calls.append(a[0].cfg.family) or evaluate(*a, **k))
    build_control_set(list(MODELS), subset[:4], export[1] / "removed", out=out, progress=False)
    assert set(calls) == {"internvl"} and out.is_file()


def test_a_rerun_with_other_settings_recomputes_every_model(subset, export, tmp_path, monkeypatch):
    out = tmp_path / "control.json"
    with pytest.raises(FileNotFoundError):
        build_control_set(["toy-llava", str(tmp_path / "no-such-model")], subset[:4], export[1] / "removed", out=out, progress=False)
    calls = []
    monkeypatch.setattr(sys.modules["hooked_vlm.experiments.evaluate"], "evaluate", lambda *a, **k: calls.append(a[0].cfg.family) or evaluate(*a, **k))
    build_control_set(["toy-llava"], subset[:4], export[1] / "removed", out=out, preprocessing={"template": "hf"}, progress=False)
    assert calls == ["llava", "llava"]  # the original and the twins, again


def test_the_commands_build_a_manifest_that_experiments_take_as_pairs(export, tmp_path):
    path, out = export
    manifest = tmp_path / "control.json"
    assert main(["control-set", "--model", "toy-llava", "--coco", str(path), "--images", str(out / "images"),
                 "--removed", str(out / "removed"), "--filters", "none", "--limit", "8", "--out", str(manifest)]) == 0  # fmt: skip
    kept = load_control_set(manifest).kept_annotation_ids
    assert kept and [p.item.annotation_id for p in control_set_dataset(manifest)] == kept
    assert main(["evaluate", "--model", "toy-llava", "--pairs", str(manifest), "--task", "list", "--out", str(tmp_path / "eval")]) == 0
    results = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert results["sample_id"].tolist() == [f"coco-{a}" for a in kept]
