"""evaluate and position_probe run end to end on a tiny model and a small synthetic dataset, and
return the documented columns."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.boxes import format_box, frame_window
from hooked_vlm.experiments import box_format, evaluate, summarize
from hooked_vlm.experiments.data import Sample, as_samples
from hooked_vlm.experiments.position_probe import position_probe, probe_sites


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("llava_multilayer"))


@pytest.fixture(scope="module")
def dataset():
    return SyntheticLocalization(6, seed=0, image_sizes=((112, 84), (84, 112)))


COLUMNS = {
    "localization": {"sample_id", "class_name", "task", "condition", "prompt", "response", "image_width", "image_height",
                     "gt_box", "pred_box", "n_boxes", "iou", "hit@0.5", "hit@0.7", "hit@0.9", "loc_score"},
    "list": {"sample_id", "class_name", "task", "condition", "prompt", "response", "correct"},
    "binary": {"sample_id", "class_name", "task", "condition", "prompt", "response", "image", "present", "answer", "correct"},
}  # fmt: skip
COLUMNS = {task: columns | {"finished", "area", "size_class", "excluded"} for task, columns in COLUMNS.items()}


@pytest.mark.parametrize("task", ["localization", "list", "binary"])
def test_evaluate_returns_one_scored_row_per_query(model, dataset, task):
    results = evaluate(model, dataset, task, batch_size=4, progress=False)
    assert set(results.columns) == COLUMNS[task]
    assert len(results) == len(dataset) * (2 if task == "binary" else 1)  # binary also asks the removed twin
    assert len(summarize(results)) == 1


def test_evaluate_applies_the_intervention_of_each_batch(model, dataset):
    calls = []

    def intervention(model, inputs, samples):
        calls.append(len(samples))
        return [("hook_inputs_embeds", lambda x, hook: x * 0)]

    plain = evaluate(model, dataset, "list", batch_size=4, progress=False)
    ablated = evaluate(model, dataset, "list", batch_size=4, intervention=intervention, condition="zeroed", progress=False)
    assert calls == [4, 2]
    assert set(ablated["condition"]) == {"zeroed"}
    assert (plain["response"] != ablated["response"]).any()


def test_evaluate_rejects_unknown_tasks(model, dataset):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, dataset, "counting", progress=False)


def test_position_probe_reports_every_site_and_axis(model, dataset):
    results = position_probe(model, dataset, SyntheticLocalization(3, seed=0, split="test", image_sizes=((112, 84),)), epochs=2, progress=False)
    assert set(results.columns) == {"section", "layer", "hook", "axis", "accuracy", "n_train", "n_test", "chance"}
    assert len(results) == 2 * len(probe_sites(model))
    assert results["accuracy"].between(0, 1).all()
    assert set(results["section"]) == {"vision", "projector", "language"}


def test_position_probe_depends_on_its_seed_only(model, dataset):
    test = SyntheticLocalization(2, seed=0, split="test", image_sizes=((112, 84),))
    first = position_probe(model, dataset, test, epochs=1, tokens_per_image=8, seed=3, progress=False)
    state = torch.get_rng_state()
    torch.rand(10)  # a global draw between the runs must not change the second one
    state_after_draw = torch.get_rng_state()
    second = position_probe(model, dataset, test, epochs=1, tokens_per_image=8, seed=3, progress=False)
    pd.testing.assert_frame_equal(first, second)
    assert not torch.equal(state, state_after_draw)
    assert torch.equal(torch.get_rng_state(), state_after_draw)  # the probe leaves the global state alone


def test_position_probe_draws_tokens_per_image_from_every_view(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))
    images = SyntheticLocalization(2, seed=0, image_sizes=((112, 56),))  # two 56-px tiles + a thumbnail
    inputs = model.prepare([s.image for s in as_samples(images)], ["Hi"] * 2)
    n_views = sum(len(views) for views in inputs.layout.views)
    assert n_views == 6
    results = position_probe(model, images, images, epochs=1, tokens_per_image=2, progress=False)
    assert (results["n_train"] == 2 * n_views).all()
    assert (results["n_test"] == 2 * n_views).all()


@pytest.mark.parametrize(
    "box, message",
    [((10, 10, 130, 50), "lies outside the image"), ((60, 10, 20, 40), "must have x1 < x2"), ((1, 2, 3), "a box is")],
)
def test_a_sample_refuses_a_ground_truth_box_outside_its_image_or_inverted(box, message):
    image = Image.new("RGB", (112, 84))
    with pytest.raises(ValueError, match=rf"sample 'cat-1' \(image 112x84\): bad ground-truth box: .*{message}"):
        Sample("cat-1", image, "cat", box, mask_fn=lambda: None)
    assert Sample("cat-2", image, "cat", (0, 0, 112, 84), mask_fn=lambda: None).box == (0, 0, 112, 84)


def test_llava_crop_frame_is_the_layouts_crop_window_at_the_checkpoints_image_size(monkeypatch):
    model = HookedVLM.from_pretrained("toy-llava")  # 32-px images, not LLaVA-1.5's 336
    model.preprocessing = replace(model.preprocessing, image_mode="crop")
    image = Image.new("RGB", (640, 427))
    view = model.prepare(image, "Hi").layout.views[0][0]
    side = view.cols * view.token_px
    window = (view.offset_x, view.offset_y, view.offset_x + view.scale_x * side, view.offset_y + view.scale_y * side)
    assert window[0] > 0 and abs(frame_window(image.size, "crop").left - window[0]) > 5  # 336 px would crop elsewhere

    whole_crop = model.tokenizer("[0.0, 0.0, 1.0, 1.0]", add_special_tokens=False).input_ids
    monkeypatch.setattr(model, "generate", lambda inputs, **kwargs: torch.tensor([whole_crop]))
    sample = Sample("wide", image, "cat", (300, 100, 400, 200), mask_fn=lambda: None, area=100 * 100)
    results = evaluate(model, [sample], "localization", progress=False)
    np.testing.assert_allclose(results["pred_box"].iloc[0], window, atol=1e-9)
    assert box_format(model) == {"family": "llava", "frame": "crop", "crop_size": 32}
    assert format_box(window, image.size, **box_format(model)) == "[0.0, 0.0, 1.0, 1.0]"


def test_an_empty_dataset_is_a_clear_error(model, dataset):
    for task in ("localization", "list", "binary"):
        with pytest.raises(ValueError, match="the dataset holds no sample"):
            evaluate(model, [], task, progress=False)
    with pytest.raises(ValueError, match="the dataset holds no sample"):
        evaluate(model, dataset, limit=0, progress=False)
    with pytest.raises(ValueError, match="the dataset holds no sample"):
        position_probe(model, [], dataset, epochs=1, progress=False)
    with pytest.raises(ValueError, match="no results to summarize"):
        summarize(pd.DataFrame())
    mixed = pd.DataFrame({"task": ["list", "localization"], "correct": [False, None], "condition": ["baseline"] * 2})
    with pytest.raises(ValueError, match=r"the table mixes tasks \['list', 'localization'\]: summarize each"):
        summarize(mixed)
