"""Every experiment through `hooked_vlm.runs` on a tiny model: in a run directory it returns its
in-memory table, a rerun computes nothing, and a run stopped part way resumes to the same table."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.experiments import (
    attention_knockout, cumulative_head_ablation, evaluate, head_mediation, object_extension, position_probe,
    token_ablation, token_shuffle,
)  # fmt: skip
from hooked_vlm.runs.records import read_shard


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))  # tiles and a thumbnail


@pytest.fixture(scope="module")
def data():
    return SyntheticLocalization(3, seed=0, image_sizes=((112, 56),))


def _ranking(model):
    return torch.arange(model.cfg.n_layers * model.cfg.n_heads, dtype=torch.float32).view(model.cfg.n_layers, -1)


EXPERIMENTS = {
    # batches of 3 queries: a sample's original and removed image may fall in two batches
    "evaluate binary": lambda m, d, **kw: evaluate(m, d, "binary", batch_size=3, **kw),
    "token ablation": lambda m, d, **kw: token_ablation(
        m, d, strategies=("object", "random", "ig"), paddings=(0,), fractions=(0.25,), seeds=(0,), fill="zero", ig_steps=2,
        ig_baseline="zero", batch_size=2, **kw
    ),
    "token shuffle": lambda m, d, **kw: token_shuffle(m, d, seeds=(0,), batch_size=2, **kw),
    "object extension": lambda m, d, **kw: object_extension(
        m, d, paddings=(0, 1), gt_scales=(0, 1), seeds=(0,), batch_size=2, **kw
    ),
    "attention knockout": lambda m, d, **kw: attention_knockout(
        m, d, group_size="all", paddings=(0,), batch_size=2, **kw
    ),
    "head mediation": lambda m, d, **kw: head_mediation(m, d, target="gt", method="attribution", **kw),
    "cumulative head ablation": lambda m, d, **kw: cumulative_head_ablation(
        m, d, {"by_index": _ranking(m)}, task="list", fractions=(0, 0.5), low_importance_from="by_index", batch_size=2, **kw
    ),
    "position probe": lambda m, d, **kw: position_probe(m, d, d, epochs=1, tokens_per_image=4, **kw),
}  # fmt: skip


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_an_experiment_in_a_run_directory_returns_its_in_memory_table_and_resumes_to_it(model, data, experiment, tmp_path):
    run = EXPERIMENTS[experiment]
    expected = run(model, data, progress=False)
    pd.testing.assert_frame_equal(run(model, data, run=tmp_path, progress=False), expected)

    shard = tmp_path / "rows" / "shard-00000.jsonl"
    records, _, _ = read_shard(shard)
    kept = b"".join(line + b"\n" for line in shard.read_bytes().split(b"\n")[: len(records) // 2])
    shard.write_bytes(kept + b"0badf00d {\"key\": \"torn")  # half the items lost, and a torn write
    pd.testing.assert_frame_equal(run(model, data, run=tmp_path, progress=False), expected)
    pd.testing.assert_frame_equal(run(model, data, run=tmp_path, progress=False), expected)
    launches = json.loads((tmp_path / "manifest.json").read_text())["launches"]
    assert [launch["items_left"] for launch in launches] == [len(records), len(records) - len(records) // 2, 0]


def test_a_rerun_asks_the_model_only_for_the_samples_left_batching_them_per_condition(model, data, tmp_path, monkeypatch):
    token_shuffle(model, data, seeds=(0,), batch_size=2, run=tmp_path, progress=False)
    shard = tmp_path / "rows" / "shard-00000.jsonl"
    shard.write_bytes(b"".join(line + b"\n" for line in shard.read_bytes().split(b"\n")[:4]))  # 4 of 9 items kept
    batches = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda inputs, **kw: batches.append(len(inputs.input_ids)) or generate(inputs, **kw))
    token_shuffle(model, data, seeds=(0,), batch_size=2, run=tmp_path, progress=False)
    assert batches == [2, 2, 1]  # recorded: baseline x3, "full s0" x1; left: "full s0" x2, "object s0" x3
