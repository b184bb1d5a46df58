"""The command line: the demo and every experiment subcommand run end to end on a tiny model and
write their outputs."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from hooked_vlm.cli import EXPERIMENTS, main
from hooked_vlm.demo import _as_written
from hooked_vlm.model import HookedVLM
from hooked_vlm.toy_models import toy_model_path


@pytest.fixture(scope="module")
def demo_run(tiny_checkpoint, tmp_path_factory):
    """One demo run on a tiny checkpoint: (output folder, warnings raised)."""
    model_dir, out = tiny_checkpoint("llava_multilayer"), tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--model", str(model_dir), "--out", str(out), "--n", "4", "--pairs", "1"]) == 0
    return out, caught


def test_demo_writes_a_report_and_figures(demo_run):
    out, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    assert {"example", "baseline", "mean_embedding", "token_ablation", "attention_knockout", "head_mediation", "figures"} <= set(report)
    for name in report["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    assert "## Head mediation" in (out / "report.md").read_text()
    assert len(pd.read_csv(out / "head_mediation.csv")) > 0


def test_demo_ablates_with_a_mean_of_held_out_images_without_warning(demo_run):
    out, caught = demo_run
    assert json.loads((out / "report.json").read_text())["mean_embedding"]["split"] == "mean"
    assert not [w for w in caught if "mean=None" in str(w.message)]


@pytest.mark.parametrize(
    "toy, answer", [("toy-llava", "[0.31, 0.28, 0.72, 0.69]"), ("toy-internvl", "<ref>red circle</ref><box>[[500, 250, 765, 781]]</box>")]
)
def test_demo_shows_an_answer_as_written_up_to_its_end_of_sequence_token(toy, answer):
    tokenizer = AutoTokenizer.from_pretrained(toy_model_path(toy))
    tokens = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert _as_written(tokenizer, torch.tensor(tokens)) == answer


EXTRA = {
    "token-ablation": ["--strategies", "object", "random", "--paddings", "0", "--seeds", "0"],
    "token-shuffle": ["--seeds", "0"],
    "object-extension": ["--paddings", "1", "--gt-scales", "0", "1", "--seeds", "0"],
    "attention-knockout": ["--group-size", "all"],
    "head-mediation": ["--target", "gt", "--method", "attribution"],
    "position-probe": ["--epochs", "1"],
    "evaluate": ["--task", "list"],
}


@pytest.mark.parametrize("command", sorted(EXPERIMENTS))
def test_every_experiment_command_writes_results(command, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / command
    args = [command, "--model", str(tiny_checkpoint("internvl_6b")), "--out", str(out), "--n", "3", "--batch-size", "2"]
    assert main(args + EXTRA[command]) == 0
    assert len(pd.read_csv(out / "results.csv")) > 0 and (out / "summary.csv").exists()
    assert "written to" in capsys.readouterr().out


def test_coco_data_needs_an_image_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--coco needs --images"):
        main(["evaluate", "--model", str(tiny_checkpoint("llava_base")), "--out", str(tmp_path), "--coco", "x.json"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_parity_exits_0_when_the_models_agree(capsys):
    assert main(["parity", "--model", "toy-llava"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_parity_exits_1_when_an_activation_diverges(monkeypatch, capsys):
    load = HookedVLM.from_pretrained

    def perturbed(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.blocks[1].attn.o_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(HookedVLM, "from_pretrained", perturbed)
    assert main(["parity", "--model", "toy-llava", "--tolerance", "1e-4"]) == 1
    assert "FAIL: first diverging activation" in capsys.readouterr().out
