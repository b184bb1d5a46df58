"""`hooked-vlm reproduce` offline on both toys: the synthetic COCO export with its object-removed
twins, a folder of images for the mean embedding; the report with the paper's columns; resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hooked_vlm.cli import main
from hooked_vlm.reproduce import paper
from hooked_vlm.toy_models import toy_dataset

MODELS = ("toy-llava", "toy-internvl")


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """The command on 2 samples of the synthetic COCO export (IG with 2 steps, 2 CMA pairs)."""
    root = tmp_path_factory.mktemp("reproduce")
    path = toy_dataset("toy-llava", 3, seed=0, split="reproduce").export_coco(root / "data")
    (root / "imagenet").mkdir()
    for i, item in enumerate(toy_dataset("toy-llava", 3, seed=0, split="mean")):
        item.image.save(root / "imagenet" / f"{i}.png")
    models = [arg for name in MODELS for arg in ("--model", name)]
    return [
        "reproduce", *models, "--coco", str(path), "--images", str(root / "data" / "images"), "--removed",
        str(root / "data" / "removed"), "--imagenet", str(root / "imagenet"), "--filters", "none", "--limit", "2",
        "--ig-steps", "2", "--cma-pairs", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def done(command, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(command + ["--out", str(out)]) == 0
    return out


def test_the_report_puts_the_papers_columns_beside_ours(done):
    report = (done / "report.md").read_text()
    for part in ("baseline", "table1", "table2", "table3", "figure1", "figure3", "figures4-5"):
        assert f"## {part}:" in report
    header = next(line for line in report.splitlines() if line.startswith("|") and "paper: LLaVA-1.5-7B" in line)
    for column in [f"paper: {m}" for m in paper.MODELS] + [f"ours: {m}" for m in MODELS]:
        assert column in header
    assert "| object +1 | localization | 0.73 " in report  # Table 1, LLaVA-7B, as published


def test_each_part_writes_a_csv_with_the_published_numbers_and_ours(done):
    table1 = pd.read_csv(done / "table1.csv")
    published = table1[(table1.source == "paper") & (table1.row == "IG 8%") & (table1.task == "list")]
    assert dict(zip(published.model, published.value)) == {"LLaVA-1.5-7B": 43.95, "LLaVA-1.5-13B": 49.24, "InternVL3.5-8B": 74.69}
    ours = table1[table1.source == "ours"]
    assert set(ours.model) == set(MODELS) and ours.value.between(0, 100).all()
    assert set(ours.row) == {"baseline", "object", "object +1", "object +2", "object -1", "IG 8%", "random 8%", "register"}
    random = ours[ours.row == "random 8%"]
    assert random.sd.notna().all()  # three seeds: mean ± sd


def test_the_reported_numbers_are_the_runs_rows_averaged(done):
    """Table 1's list column of each toy, recomputed from the rows its runs recorded: the mean
    over samples, then over seeds (random 8%: three seeds, their sd)."""
    from hooked_vlm.runs.records import read_shard, shard_files

    table1 = pd.read_csv(done / "table1.csv").query("source == 'ours' and task == 'list'")
    for model in MODELS:
        records = [r for f in shard_files(done / model / "table1" / "list" / "rows") for _, rows, _ in read_shard(f)[0] for r in rows]
        rows = pd.DataFrame(records).assign(stem=lambda t: t.condition.str.replace(r" s\d+$", "", regex=True))
        per_seed = rows.groupby(["stem", "condition"])["correct"].mean() * 100
        ours = table1[table1.model == model].set_index("row")
        assert ours.loc["object", "value"] == pytest.approx(per_seed["object+0"].mean())
        assert ours.loc["register", "value"] == pytest.approx(per_seed["register"].mean())
        assert ours.loc["random 8%", "value"] == pytest.approx(per_seed["random 8%"].mean())
        assert ours.loc["random 8%", "sd"] == pytest.approx(per_seed["random 8%"].std(), nan_ok=True)


def test_table3_is_internvls_alone(done):
    ours = pd.read_csv(done / "table3.csv").query("source == 'ours'")
    assert set(ours.model) == {"toy-internvl"}
    assert {"global object", "local object +1"} <= set(ours.row)


def test_the_papers_settings_are_used_and_recorded(done):
    report = (done / "report.md").read_text()
    assert "the paper's: {'image_mode': 'pad', 'template': 'vicuna_v1'}" in report
    assert "the paper's: {'max_tiles': 6, 'template': 'internvl2_5'}" in report
    manifest = json.loads((done / "toy-internvl" / "table2" / "list" / "manifest.json").read_text())
    assert manifest["model"]["prompt_settings"] == {"max_tiles": 6, "template": "internvl2_5"}


def test_a_rerun_reads_the_finished_parts_back(done, command, monkeypatch, capsys):
    import hooked_vlm.reproduce.parts as parts

    before = (done / "table1.csv").read_text()
    monkeypatch.setattr(parts, "PARTS", {name: _never for name in parts.PARTS})
    assert main(command + ["--out", str(done)]) == 0
    assert (done / "table1.csv").read_text() == before
    assert "toy-internvl figures4-5: done before" in capsys.readouterr().out


def _never(ctx):
    raise AssertionError("a finished part was computed again")


def test_a_killed_part_resumes_from_its_runs(done, command, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "toy-llava" / "table2" / "done.json").unlink()  # killed after its experiments, before it was marked done
    shard = out / "toy-llava" / "table2" / "list" / "rows" / "shard-00000.jsonl"
    shard.write_bytes(b"".join(line + b"\n" for line in shard.read_bytes().split(b"\n")[:3]))  # and mid-experiment
    assert main(command + ["--out", str(out), "--only", "table2"]) == 0
    ours = lambda path: pd.read_csv(path).query("source == 'ours'").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(ours(out / "table2.csv"), ours(done / "table2.csv"))


def test_a_rerun_with_other_arguments_is_refused(done, command):
    with pytest.raises(SystemExit, match=r"arguments\.settings: \"paper\" recorded, \"checkpoint\" now"):
        main(command + ["--out", str(done), "--settings", "checkpoint", "--only", "baseline"])


def test_a_part_that_needs_the_mean_without_imagenet_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="table1 .* ImageNet val"):
        main(["reproduce", "--model", "toy-llava", "--out", str(tmp_path), "--pairs", "x.json", "--only", "table1"])


def test_an_unknown_part_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown part.*table9"):
        main(["reproduce", "--model", "toy-llava", "--out", str(tmp_path), "--only", "table9"])


def test_paper_models_are_recognised_by_name():
    assert paper.paper_model("llava-hf/llava-1.5-7b-hf") == "LLaVA-1.5-7B"
    assert paper.paper_model("liuhaotian/llava-v1.5-13b") == "LLaVA-1.5-13B"
    assert paper.paper_model("OpenGVLab/InternVL3_5-8B-HF") == "InternVL3.5-8B"
    assert paper.paper_model("toy-llava") is None


def test_a_rerun_on_other_data_at_the_same_path_is_refused(tmp_path):
    """A finished part is read back only for the same samples: an annotation file (or control
    set) rebuilt at the same path is other data, not the finished part's."""
    annotations = toy_dataset("toy-llava", 2, seed=0, split="reproduce").export_coco(tmp_path / "data")
    command = ["reproduce", "--model", "toy-llava", "--coco", str(annotations), "--images", str(tmp_path / "data" / "images"),
               "--removed", str(tmp_path / "data" / "removed"), "--filters", "none", "--limit", "1", "--only", "baseline",
               "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(command) == 0
    toy_dataset("toy-llava", 2, seed=1, split="reproduce").export_coco(tmp_path / "data")  # other scenes, same paths
    with pytest.raises(SystemExit, match=r"arguments\.data"):
        main(command)
