"""The command line: the demo and every experiment subcommand run end to end on a tiny model and
write their outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from hooked_vlm.cli import EXPERIMENTS, main


def test_demo_writes_a_report_and_figures(tiny_checkpoint, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_checkpoint("llava_multilayer")), "--out", str(out), "--n", "4", "--pairs", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"example", "baseline", "token_ablation", "attention_knockout", "head_mediation", "figures"} <= set(report)
    for name in report["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    assert "## Head mediation" in (out / "report.md").read_text()
    assert len(pd.read_csv(out / "head_mediation.csv")) > 0


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
