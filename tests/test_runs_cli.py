"""`hooked-vlm token-ablation` on toy-llava as a long run: SIGKILLed at several points and
resumed, it ends with the uninterrupted run's table (no row missing, none twice); launched on 2
processes with `accelerate launch`, each process computes its share and the merged table is the
one-process table; a rerun with other arguments is refused, and `--overwrite` starts again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hooked_vlm.cli import main
from hooked_vlm.runs.records import read_shard, shard_files

COMMAND = ["token-ablation", "--model", "toy-llava", "--n", "3", "--strategies", "object", "random", "--paddings", "0",
           "--seeds", "0", "--fractions", "0.08"]  # fmt: skip
N_ITEMS = 9  # 3 conditions (baseline, object+0, random 8% s0) x 3 samples
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# The command in a child process, with a test-only way to die at a chosen instant: "record" dies in
# the middle of writing its first record (half the line written and fsynced: a torn write),
# "results" just before results.csv replaces the previous file. Anything else: no hook.
HOOKED = """
import os, signal, sys
from hooked_vlm.runs import records

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv.pop(1)
if point == "record":
    def torn(self, key, rows):
        line = records.encode(key, rows, self.run)
        self.file.write(line[: len(line) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        die()
    records.ShardWriter.append = torn
elif point == "results":
    replace = os.replace
    os.replace = lambda src, dst: die() if str(dst).endswith("results.csv") else replace(src, dst)
from hooked_vlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """The uninterrupted one-process run."""
    out = tmp_path_factory.mktemp("reference")
    assert main(COMMAND + ["--out", str(out), "--batch-size", "1"]) == 0
    return pd.read_csv(out / "results.csv")


def records(out: Path) -> list[str]:
    """The recorded item keys over every shard, in file order (duplicates kept)."""
    return [key for path in shard_files(out / "rows") for key, _, _ in read_shard(path)[0]]


def complete_lines(out: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in shard_files(out / "rows"))


def child(out: Path, point: str = "none", *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}-{point}-{time.monotonic_ns()}.log", "wb")
    argv = [sys.executable, "-c", HOOKED, point, *COMMAND, "--out", str(out), "--batch-size", "1", *extra]
    return subprocess.Popen(argv, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, ready) -> None:
    """SIGKILL `process` as soon as `ready()` holds (polled every 10 ms)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, "the run ended before its kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_table(reference, tmp_path):
    out = tmp_path / "run"
    kill_when(child(out), lambda: (out / "manifest.json").exists())  # at the start
    first = len(records(out))
    kill_when(child(out), lambda: complete_lines(out) >= first + 2)  # between records
    assert child(out, "record").wait() == -signal.SIGKILL  # in the middle of writing a record
    assert not (out / "rows" / "shard-00000.jsonl").read_bytes().endswith(b"\n")  # it left a torn line
    torn = len(records(out))
    assert child(out, "results").wait() == -signal.SIGKILL  # after the last record, writing results.csv
    assert not (out / "results.csv").exists()
    assert sorted(records(out)) == sorted(set(records(out))) and len(records(out)) == N_ITEMS > torn

    assert main(COMMAND + ["--out", str(out), "--batch-size", "1"]) == 0  # nothing left: merged and written
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), reference)
    launches = json.loads((out / "manifest.json").read_text())["launches"]
    assert len(launches) == 5 and launches[-1]["items_left"] == 0 and launches[0]["items_left"] == N_ITEMS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch_share_the_items_and_give_the_one_process_table(reference, tmp_path):
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    done = subprocess.run([*launch, "-m", "hooked_vlm", *COMMAND, "--out", str(out), "--batch-size", "2", "--device", "cpu"],
                          env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shards = {path.name: [key for key, _, _ in read_shard(path)[0]] for path in shard_files(out / "rows")}
    assert sorted(shards) == ["shard-00000.jsonl", "shard-00001.jsonl"] and all(shards.values())
    keys = [key for share in shards.values() for key in share]
    assert len(keys) == len(set(keys)) == N_ITEMS  # each item computed once, by one process
    samples = [{key.rpartition("|")[2] for key in share} for share in shards.values()]
    assert not samples[0] & samples[1]  # a sample's conditions all in one process
    assert json.loads((out / "manifest.json").read_text())["launches"][0]["processes"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), reference)


def test_a_rerun_with_other_arguments_is_refused_and_overwrite_starts_again(tiny_checkpoint, tmp_path, capsys):
    command = ["evaluate", "--model", str(tiny_checkpoint("llava_base")), "--out", str(tmp_path), "--n", "2", "--task", "list"]
    assert main(command) == 0
    with pytest.raises(SystemExit, match=r"holds a run made otherwise:\n  arguments\.n: 2 recorded, 3 now"):
        main(command + ["--n", "3"])
    assert main(command + ["--batch-size", "1"]) == 0  # the batch size may change on resume
    assert main(command + ["--n", "3", "--overwrite"]) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3


# the experiment function each command runs (cumulative-head-ablation first runs head mediation, in a run of its own)
COMMAND_FUNCTIONS = {
    "evaluate": ("evaluate", "."), "token-ablation": ("token_ablation", "."), "token-shuffle": ("token_shuffle", "."),
    "object-extension": ("object_extension", "."), "attention-knockout": ("attention_knockout", "."),
    "head-mediation": ("head_mediation", "."), "position-probe": ("position_probe", "."),
    "cumulative-head-ablation": ("head_mediation", "mediation"), "edge-circuit": ("edge_circuit", "."),
}  # fmt: skip


def test_every_experiment_command_runs_its_experiment_in_the_out_run(monkeypatch, tmp_path):
    from hooked_vlm import experiments
    from hooked_vlm.cli import EXPERIMENTS
    from hooked_vlm.runs import Run

    class Called(Exception):
        pass

    assert sorted(COMMAND_FUNCTIONS) == sorted(EXPERIMENTS)
    monkeypatch.setattr("hooked_vlm.cli._ablation_mean", lambda model, args: None)  # not what is tested
    for command, (function, folder) in COMMAND_FUNCTIONS.items():
        monkeypatch.setattr(experiments, function, lambda *args, **kwargs: (_ for _ in ()).throw(Called(kwargs.get("run"))))
        out = tmp_path / command
        with pytest.raises(Called) as called:
            main([command, "--model", "toy-llava", "--out", str(out), "--n", "4"])
        run = called.value.args[0]
        assert isinstance(run, Run) and run.directory == out / folder, command
