"""The circuit experiments as long runs (`hooked_vlm.runs`): one item per pair; in a run directory
they return the in-memory table, a run stopped part way resumes to it, and the per-pair records
add up to the scores of all the pairs attributed at once. `edge-circuit` launched on 2 processes
gives the one-process tables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.circuits import edge_attribution
from hooked_vlm.cli import main
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.experiments import circuit_faithfulness, edge_circuit
from hooked_vlm.experiments.edge_circuit import as_circuit_pairs
from hooked_vlm.runs.records import read_shard, shard_files

ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))


@pytest.fixture(scope="module")
def data():
    return SyntheticLocalization(4, seed=0, image_sizes=((112, 56),))


def _lose_half_and_tear(directory) -> int:
    """Keep the first half of the recorded items and append a torn line; the number kept."""
    shard = directory / "rows" / "shard-00000.jsonl"
    records, _, _ = read_shard(shard)
    kept = len(records) // 2
    shard.write_bytes(b"".join(line + b"\n" for line in shard.read_bytes().split(b"\n")[:kept]) + b'0badf00d {"key": "torn')
    return kept


RUNS = {
    "edge circuit": lambda m, d, **kw: edge_circuit(m, d, target="gt", steps=2, spans=True, **kw),
    "edge circuit, both towers, |score|": lambda m, d, **kw: edge_circuit(
        m, d, target="gt", method="EAP", towers=("vision", "language"), aggregation="mean_abs", **kw
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_edge_circuit_in_a_run_directory_returns_its_in_memory_table_and_resumes_to_it(model, data, name, tmp_path):
    run = RUNS[name]
    expected = run(model, data, progress=False)
    pd.testing.assert_frame_equal(run(model, data, run=tmp_path, progress=False), expected)
    kept = _lose_half_and_tear(tmp_path)
    pd.testing.assert_frame_equal(run(model, data, run=tmp_path, progress=False), expected)
    launches = json.loads((tmp_path / "manifest.json").read_text())["launches"]
    assert [launch["items_left"] for launch in launches] == [len(data), len(data) - kept]


def test_per_pair_records_add_up_to_the_pairs_attributed_at_once(model, data):
    pairs = as_circuit_pairs(model, data, target="gt")
    table = edge_circuit(model, pairs, method="EAP", progress=False)
    graph = edge_attribution(model, pairs, method="EAP", progress=False)
    at_once = graph.edges().set_index("edge")["score"]
    assert torch.allclose(torch.tensor(table.set_index("edge")["score"].loc[at_once.index].to_numpy()),
                          torch.tensor(at_once.to_numpy()), rtol=1e-5, atol=1e-7)  # fmt: skip


def test_circuit_faithfulness_resumes_to_its_in_memory_table(model, data, tmp_path):
    edges = edge_circuit(model, data, target="gt", method="EAP", progress=False)
    expected = circuit_faithfulness(model, data, edges, fractions=(0.05, 0.5, 1.0), target="gt", progress=False)
    assert expected.groupby("ranking")["faithfulness"].last().tolist() == pytest.approx([1.0, 1.0])
    run = lambda: circuit_faithfulness(model, data, edges, fractions=(0.05, 0.5, 1.0), target="gt", run=tmp_path, progress=False)  # noqa: E731
    pd.testing.assert_frame_equal(run(), expected)
    _lose_half_and_tear(tmp_path)
    pd.testing.assert_frame_equal(run(), expected)


def test_a_resume_with_other_edge_scores_is_refused(model, data, tmp_path):
    edges = edge_circuit(model, data, target="gt", method="EAP", progress=False)
    circuit_faithfulness(model, data, edges, fractions=(0.5, 1.0), target="gt", run=tmp_path, progress=False)
    other = edges.assign(score=edges["score"][::-1].to_numpy())
    with pytest.raises(ValueError, match="made otherwise"):
        circuit_faithfulness(model, data, other, fractions=(0.5, 1.0), target="gt", run=tmp_path, progress=False)


COMMAND = ["edge-circuit", "--n", "4", "--steps", "2", "--target", "gt", "--fractions", "0.1", "1", "--spans"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edge_circuit_on_two_processes_gives_the_one_process_tables(tiny_checkpoint, tmp_path):
    command = [*COMMAND, "--model", str(tiny_checkpoint("llava_base"))]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    done = subprocess.run([*launch, "-m", "hooked_vlm", *command, "--out", str(tmp_path / "two"), "--device", "cpu"],
                          env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("", "faithfulness"):  # the edge scores, and the faithfulness curves (a child run)
        shards = [[key for key, *_ in read_shard(path)[0]] for path in shard_files(tmp_path / "two" / run / "rows")]
        assert len(shards) == 2 and all(shards) and sorted(sum(shards, [])) == sorted(set(sum(shards, [])))
    for name in ("results.csv", "summary.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / name), pd.read_csv(tmp_path / "one" / name))
