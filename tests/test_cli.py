"""The command line: the demo and every experiment subcommand run end to end on a tiny model and
write their outputs."""

from __future__ import annotations

import json
import shlex
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from hooked_vlm import experiments
from hooked_vlm import interventions as iv
from hooked_vlm.cli import EXPERIMENTS, main, parser
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


def test_demo_reports_the_last_layers_heads_as_not_measured(demo_run):
    """Patched at the prompt positions, the last layer cannot reach the answer's digits: the
    report lists its heads as not measured (not MF 0) and never among the top heads."""
    out, _ = demo_run
    mediation = json.loads((out / "report.json").read_text())["head_mediation"]
    n_layers, n_heads = mediation["shape"]
    assert mediation["not_measured"] == [{"layer": n_layers - 1, "head": h} for h in range(n_heads)]
    assert all(h["layer"] < n_layers - 1 for h in mediation["top_heads"])
    report = (out / "report.md").read_text()
    assert f"The {n_heads} heads of the last layer (L{n_layers - 1}) are not measured" in report
    assert "0 by construction" not in report


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
    "cumulative-head-ablation": ["--fractions", "0", "0.25", "--method", "attribution", "--target", "gt"],
    "edge-circuit": ["--fractions", "0.1", "1", "--steps", "2", "--target", "gt", "--towers", "vision", "language", "--spans"],
}


@pytest.mark.parametrize("command", sorted(EXPERIMENTS))
def test_every_experiment_command_writes_results(command, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / command
    args = [command, "--model", str(tiny_checkpoint("internvl_6b")), "--out", str(out), "--n", "3", "--batch-size", "2"]
    assert main(args + EXTRA[command]) == 0
    assert len(pd.read_csv(out / "results.csv")) > 0 and (out / "summary.csv").exists()
    with Image.open(out / "figure.png") as image:
        assert image.format == "PNG"
    assert "written to" in capsys.readouterr().out


def test_coco_data_needs_an_image_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--coco needs --images"):
        main(["evaluate", "--model", str(tiny_checkpoint("llava_base")), "--out", str(tmp_path), "--coco", "x.json"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def _example_commands() -> list[list[str]]:
    epilog = parser().epilog.replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in epilog.splitlines() if line.strip().startswith("hooked-vlm ")]


def test_help_shows_the_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hooked-vlm cumulative-head-ablation --model toy-llava" in capsys.readouterr().out


@pytest.mark.parametrize("example", _example_commands(), ids=" ".join)
def test_every_example_in_the_help_parses(example):
    assert parser().parse_args(example).command == example[0]


class Captured(Exception):
    """Raised by a stand-in experiment with the arguments the command passed it."""


def capture(monkeypatch, name: str) -> None:
    def stand_in(*args, **kwargs):
        raise Captured(args, kwargs)

    monkeypatch.setattr(experiments, name, stand_in)


def captured_call(argv: list[str]) -> tuple[tuple, dict]:
    with pytest.raises(Captured) as call:
        main(argv)
    return call.value.args


def test_evaluate_offers_the_yes_no_task(tmp_path):
    assert main(["evaluate", "--model", "toy-llava", "--out", str(tmp_path), "--n", "2", "--task", "binary"]) == 0
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["task"]) == {"binary"} and set(results["image"]) == {"original", "removed"}
    assert (tmp_path / "figure.png").exists()


def test_head_mediation_passes_the_batch_size(monkeypatch, tmp_path):
    capture(monkeypatch, "head_mediation")
    _, kwargs = captured_call(["head-mediation", "--model", "toy-llava", "--out", str(tmp_path), "--batch-size", "3"])
    assert kwargs["batch_size"] == 3


@pytest.mark.parametrize("command, function", [
    ("evaluate", "evaluate"), ("token-ablation", "token_ablation"), ("token-shuffle", "token_shuffle"),
    ("object-extension", "object_extension"), ("attention-knockout", "attention_knockout"), ("head-mediation", "head_mediation"),
])  # fmt: skip
def test_the_internvl_float_box_reading_reaches_the_experiment(monkeypatch, tmp_path, command, function):
    capture(monkeypatch, function)
    argv = [command, "--model", "toy-internvl", "--out", str(tmp_path), "--n", "1", "--float-boxes", "thousandths"]
    _, kwargs = captured_call(argv)
    assert kwargs["float_boxes"] == "thousandths"


def test_the_internvl_float_box_reading_reaches_cumulative_ablation_and_its_mediation(monkeypatch, tmp_path):
    mediation = pd.DataFrame([{"pair_id": "p", "layer": 0, "head": h, "mf": 0.1 * h, "task": "localization"} for h in range(4)])
    seen = []
    monkeypatch.setattr(experiments, "head_mediation", lambda *a, **kwargs: seen.append(kwargs["float_boxes"]) or mediation)
    monkeypatch.setattr(experiments, "mediation_map", lambda table: torch.zeros(4, 4))
    capture(monkeypatch, "cumulative_head_ablation")
    argv = ["cumulative-head-ablation", "--model", "toy-internvl", "--out", str(tmp_path), "--n", "1",
            "--float-boxes", "thousandths"]  # fmt: skip
    _, kwargs = captured_call(argv)
    assert kwargs["float_boxes"] == "thousandths" and seen == ["thousandths"]


def test_the_list_task_s_match_reaches_cumulative_ablation(monkeypatch, tmp_path):
    mf = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    pd.DataFrame(mf.numpy()).rename_axis("layer").to_csv(tmp_path / "summary.csv")
    capture(monkeypatch, "cumulative_head_ablation")
    argv = ["cumulative-head-ablation", "--model", "toy-llava", "--out", str(tmp_path / "out"), "--ranking",
            str(tmp_path / "summary.csv"), "--task", "list", "--match", "substring"]  # fmt: skip
    _, kwargs = captured_call(argv)
    assert kwargs["match"] == "substring"


def test_the_cma_token_filter_reaches_head_mediation(monkeypatch, tmp_path):
    capture(monkeypatch, "head_mediation")
    argv = ["head-mediation", "--model", "toy-llava", "--out", str(tmp_path), "--n", "1", "--token-filter", "significant_digits"]
    _, kwargs = captured_call(argv)
    assert kwargs["token_filter"] == "significant_digits"


def test_the_cma_token_filter_reaches_the_mediation_that_ranks_cumulative_ablation(monkeypatch, tmp_path):
    capture(monkeypatch, "head_mediation")
    argv = ["cumulative-head-ablation", "--model", "toy-llava", "--out", str(tmp_path), "--n", "1",
            "--token-filter", "significant_digits"]  # fmt: skip
    _, kwargs = captured_call(argv)
    assert kwargs["token_filter"] == "significant_digits"


def test_position_probe_trains_on_at_most_limit_samples(monkeypatch, tmp_path):
    capture(monkeypatch, "position_probe")
    (_, train, test), _ = captured_call(["position-probe", "--model", "toy-llava", "--out", str(tmp_path), "--n", "20", "--limit", "8"])
    assert len(train) == 8 and len(test) == 4


def test_position_probe_holds_out_coco_images_it_does_not_train_on(monkeypatch, tmp_path):
    items = [SimpleNamespace(image_id=i // 2, annotation_id=i) for i in range(40)]  # two objects per image
    monkeypatch.setattr("hooked_vlm.cli._dataset", lambda args: items)
    capture(monkeypatch, "position_probe")
    argv = ["position-probe", "--model", "toy-llava", "--out", str(tmp_path), "--coco", "ann.json"]
    (_, train, test), _ = captured_call(argv)
    train_images, test_images = [i.image_id for i in train], [i.image_id for i in test]
    assert len(set(train_images)) == len(train_images) == 16 and len(test_images) == 4
    assert not set(train_images) & set(test_images)
    assert captured_call(argv)[0][2] == test  # seeded
    assert captured_call(argv + ["--seed", "1"])[0][2] != test


def test_token_ablation_on_synthetic_data_ablates_with_the_mean_split_without_warning(monkeypatch, tmp_path):
    capture(monkeypatch, "token_ablation")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, kwargs = captured_call(["token-ablation", "--model", "toy-llava", "--out", str(tmp_path)])
    assert isinstance(kwargs["mean"], iv.MeanEmbedding) and kwargs["mean"].count > 0
    assert torch.equal(iv.load_mean(tmp_path / "mean_embedding.pt").vector, kwargs["mean"].vector)


def test_token_ablation_reads_a_saved_mean(monkeypatch, tmp_path):
    capture(monkeypatch, "token_ablation")
    _, kwargs = captured_call(["token-ablation", "--model", "toy-llava", "--out", str(tmp_path), "--mean", "m.pt"])
    assert kwargs["mean"] == "m.pt"


def test_token_ablation_on_coco_without_a_mean_leaves_it_to_the_experiment(monkeypatch, tmp_path):
    monkeypatch.setattr("hooked_vlm.cli._dataset", lambda args: [])
    capture(monkeypatch, "token_ablation")
    _, kwargs = captured_call(["token-ablation", "--model", "toy-llava", "--out", str(tmp_path), "--coco", "ann.json"])
    assert kwargs["mean"] is None  # token_ablation averages the dataset's images and says so


def test_knockout_on_a_shallow_model_knocks_out_single_layers_and_all(monkeypatch, tmp_path, capsys):
    capture(monkeypatch, "attention_knockout")
    _, kwargs = captured_call(["attention-knockout", "--model", "toy-llava", "--out", str(tmp_path)])
    assert kwargs["group_size"] == [1, "all"]
    assert "the model has 4 layers" in capsys.readouterr().out


def test_cumulative_head_ablation_ranks_heads_by_a_saved_mediation_map(monkeypatch, tmp_path):
    mf = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    pd.DataFrame(mf.numpy()).rename_axis("layer").to_csv(tmp_path / "summary.csv")
    capture(monkeypatch, "cumulative_head_ablation")
    argv = ["cumulative-head-ablation", "--model", "toy-llava", "--out", str(tmp_path / "out"), "--ranking", str(tmp_path / "summary.csv")]
    (_, _, rankings), kwargs = captured_call(argv)
    assert torch.equal(rankings["mediation"], mf) and kwargs["low_importance_from"] == "mediation"


def test_cumulative_head_ablation_reads_unmeasured_heads_as_nan_and_says_so(monkeypatch, tmp_path, capsys):
    mf = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    mf[3] = float("nan")  # the last layer at the prompt positions: empty cells in summary.csv
    pd.DataFrame(mf.numpy()).rename_axis("layer").to_csv(tmp_path / "summary.csv")
    capture(monkeypatch, "cumulative_head_ablation")
    argv = ["cumulative-head-ablation", "--model", "toy-llava", "--out", str(tmp_path / "out"), "--ranking", str(tmp_path / "summary.csv")]
    (_, _, rankings), _ = captured_call(argv)
    assert torch.equal(rankings["mediation"].isnan(), mf.isnan()) and torch.equal(rankings["mediation"][:3], mf[:3])
    assert "note: 4 of 16 heads have no MF (not measured)" in capsys.readouterr().out


def test_cumulative_head_ablation_without_a_ranking_runs_head_mediation_first(tiny_checkpoint, tmp_path):
    argv = ["cumulative-head-ablation", "--model", str(tiny_checkpoint("llava_multilayer")), "--out", str(tmp_path), "--n", "2",
            "--fractions", "0", "0.5", "--method", "attribution", "--target", "gt"]  # fmt: skip
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "mediation.csv")) > 0
    assert set(pd.read_csv(tmp_path / "results.csv")["ranking"]) == {"localization", "low_importance"}
    assert "normalised_auc" in pd.read_csv(tmp_path / "summary.csv")


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
