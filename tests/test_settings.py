"""The prompt settings (image mode, tile limit, template) as one setting of the model: what
`use_settings` accepts, what `prepare` makes of it, and that every experiment and result honours it."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.cli import main
from hooked_vlm.prompt_settings import PromptSettings, paper_settings
from hooked_vlm.provenance import model_identity, with_preprocessing
from hooked_vlm.runs import RunMismatch
from hooked_vlm.toy_models import toy_dataset

TOYS = ("toy-llava", "toy-internvl")
PAPER = {  # what the paper's settings pass to the family's prepare (PAPER_PROTOCOL §1.1, §1.3)
    "toy-llava": {"image_mode": "pad", "template": "vicuna_v1"},
    "toy-internvl": {"max_tiles": 6, "template": "internvl2_5"},
}


@pytest.fixture(scope="module")
def toys():
    return {name: HookedVLM.from_pretrained(name) for name in TOYS}


@pytest.fixture(params=TOYS)
def toy(request, toys):
    return request.param, toys[request.param]


@pytest.fixture
def model(toy):
    name, model = toy
    yield model
    model.use_settings(PromptSettings())  # the module's model starts every test with its own settings



# ---------------------------------------------------------------------------------- the setting
def test_a_fresh_model_uses_the_checkpoints_own_settings(toy, photos):
    name, model = toy
    assert model.prompt_settings == PromptSettings()
    own = model.preprocessing
    explicit = {"image_mode": own.image_mode} if name == "toy-llava" else {"max_tiles": own.max_tiles}
    a = model.prepare(photos["chelsea"], "Where is the cat?")
    b = model.prepare(photos["chelsea"], "Where is the cat?", template=own.template, **explicit)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_paper_settings_are_pad_or_six_tiles_and_the_models_own_template(toy):
    name, model = toy
    assert paper_settings(model).given() == PAPER[name]


def test_prepare_takes_the_settings_the_caller_does_not_pass(model, prepare_spy, photos):
    model.use_settings(paper_settings(model))
    seen = prepare_spy(model)
    inputs = model.prepare(photos["chelsea"], "Where is the cat?")
    assert seen[-1] == PAPER[model.name_or_path]
    system = "A chat between" if model.cfg.family == "llava" else "<|im_start|>system"
    assert inputs.text[0].startswith(system)


def test_an_explicit_argument_wins_over_the_setting(model, prepare_spy, photos):
    model.use_settings(template=PAPER[model.name_or_path]["template"])
    seen = prepare_spy(model)
    inputs = model.prepare(photos["chelsea"], "Where is the cat?", template="hf")
    assert seen[-1]["template"] == "hf" and inputs.text[0].startswith(("USER:", "<|im_start|>user"))


def test_pad_and_six_tiles_change_the_pixels_as_asked(photos):
    llava = HookedVLM.from_pretrained("toy-llava").use_settings(image_mode="crop")
    crop = llava.prepare(photos["coffee_wide"], "x").pixel_values
    pad = llava.use_settings(image_mode="pad").prepare(photos["coffee_wide"], "x").pixel_values
    assert not torch.equal(crop, pad)
    internvl = HookedVLM.from_pretrained("toy-internvl")
    wide = photos["astronaut"].resize((800, 100))  # wants 8 tiles in a row
    assert len(internvl.use_settings(max_tiles=6).prepare(wide, "x").layout.views[0]) == 6 + 1  # and a thumbnail
    assert len(internvl.use_settings(max_tiles=2).prepare(wide, "x").layout.views[0]) == 2 + 1


def test_use_settings_changes_one_field_and_keeps_the_others(model):
    model.use_settings(paper_settings(model))
    model.use_settings(template="hf")
    assert model.prompt_settings == PromptSettings(**(PAPER[model.name_or_path] | {"template": "hf"}))


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("toy-llava", {"template": "chatml"}, r"unknown llava template 'chatml'; expected one of 'hf', 'vicuna_v1'"),
        ("toy-llava", {"image_mode": "squash"}, r"unknown llava image_mode 'squash'; expected one of 'pad', 'crop'"),
        ("toy-llava", {"max_tiles": 6}, r"max_tiles is not a setting of llava models"),
        ("toy-internvl", {"image_mode": "pad"}, r"image_mode is not a setting of internvl models"),
        ("toy-internvl", {"max_tiles": 0}, r"max_tiles must be at least 1"),
        ("toy-internvl", {"template": "vicuna_v1"}, r"unknown internvl template 'vicuna_v1'"),
    ],
)
def test_a_setting_the_family_cannot_honour_is_a_clear_error(toys, name, fields, message):
    with pytest.raises(ValueError, match=message):
        toys[name].use_settings(**fields)
    assert toys[name].prompt_settings == PromptSettings()  # unchanged


def test_an_unknown_setting_is_a_type_error(model):
    with pytest.raises(TypeError, match="no prompt setting tiles"):
        model.use_settings(tiles=6)


def test_results_record_the_settings_in_force(model):
    assert model_identity(model)["prompt_settings"]["template"] == "hf"
    model.use_settings(paper_settings(model))
    identity = model_identity(model)
    assert identity["prompt_settings"] == PAPER[model.name_or_path]
    assert identity["preprocessing"]["template"] == PAPER[model.name_or_path]["template"]


def test_with_preprocessing_overrides_the_settings_for_a_block_and_restores_them(model, prepare_spy, photos):
    model.use_settings(paper_settings(model))
    seen = prepare_spy(model)
    with with_preprocessing(model, {"template": "hf"}) as settings:
        model.prepare(photos["chelsea"], "x")
    assert seen[-1]["template"] == "hf" and settings["template"] == "hf"
    assert model.prompt_settings == paper_settings(model)


# ---------------------------------------------------------------------------------- run manifests
def test_the_run_manifest_records_the_settings_and_a_resume_with_others_is_refused(model, tmp_path):
    from hooked_vlm.experiments import evaluate

    data = toy_dataset(model.name_or_path, 2, seed=0)
    model.use_settings(paper_settings(model))
    evaluate(model, data, "list", run=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["prompt_settings"] == PAPER[model.name_or_path]
    model.use_settings(template="hf")
    with pytest.raises(RunMismatch, match=r"model\.prompt_settings\.template: \"internvl2_5\"|model\.prompt_settings\.template: \"vicuna_v1\""):
        evaluate(model, data, "list", run=tmp_path, progress=False)


def test_the_command_line_applies_the_settings_and_refuses_a_resume_with_others(tmp_path):
    command = ["evaluate", "--model", "toy-internvl", "--n", "2", "--task", "list", "--out", str(tmp_path), "--paper-settings"]
    assert main(command) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["prompt_settings"] == PAPER["toy-internvl"]
    with pytest.raises(SystemExit, match=r"arguments\.max_tiles: null recorded, 3 now"):
        main(command + ["--max-tiles", "3"])


def test_a_command_line_setting_of_the_other_family_names_it(tmp_path):
    with pytest.raises(SystemExit, match="image_mode is not a setting of internvl models"):
        main(["evaluate", "--model", "toy-internvl", "--n", "2", "--out", str(tmp_path), "--image-mode", "pad"])
