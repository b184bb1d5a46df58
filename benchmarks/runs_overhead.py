"""What the run bookkeeping of `hooked_vlm.runs` costs: the manifest, one fsynced record per item,
the shares and the merge, against the experiment it records, on the mid-size models of run.py.

    python benchmarks/runs_overhead.py            # mid-size models (about 10 minutes on 2 CPU cores)
    python benchmarks/runs_overhead.py --quick    # small models, a smoke run (to runs_overhead_quick.json)

Two experiments per family, on synthetic 640x480 images (LLaVA: 576 image tokens; InternVL: 6
tiles and the thumbnail, 1792): `token_ablation` (3 conditions x 4 samples = 12 small items, one
generation of 40 tokens per batch of 4: the most records per second of compute) and exact
`head_mediation` (2 pairs, one record of every head's row each). Each is timed three ways,
interleaved (`run.interleaved`: rounds in a shuffled order, medians):

- `memory`: in memory (`run=None`), the experiment alone;
- `recorded`: into a fresh run directory: every item appended and fsynced as it completes, the
  manifest written (code version included), the shard read back and merged;
- `rerun`: the same command again on the complete directory: nothing left to compute, so it is
  what a resume costs beyond the items it computes (manifest check, reading every record, merge).

The bookkeeping of a recorded run is also timed directly, function by function (records appended,
shards read, manifest described, read and written, shares dealt): the end-to-end difference
between two runs of a minute is below the machine's noise, the direct time is not. The figure of
the issue is `bookkeeping / memory` (target < 2%). Results: stdout, and
`benchmarks/runs_overhead.json` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import build, interleaved  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.data.synthetic import SyntheticLocalization  # noqa: E402
from hooked_vlm.experiments import head_mediation, token_ablation  # noqa: E402
from hooked_vlm.runs import records, run  # noqa: E402
from hooked_vlm.runs.launch import Processes  # noqa: E402

# the bookkeeping functions a recorded run calls (everything it does besides the experiment's work
# and the table the in-memory call builds too)
BOOKKEEPING = [
    (records.ShardWriter, "append"),  # encode, write, fsync: once per item
    (records, "read_shard"),  # resume: what is recorded; the end: the merge; a shard's torn tail
    (run.Run, "_identity"),  # the manifest's description of model, settings and items
    (run.Run, "_recorded"),  # reading the manifest
    (run.Run, "_write_manifest"),  # with the code version (git)
    (Processes, "share"),
]
EXPERIMENTS = {
    "token_ablation": lambda model, data, **kw: token_ablation(
        model, data, strategies=("object", "random"), paddings=(0,), fractions=(0.08,), seeds=(0,), fill="zero", batch_size=4,
        **kw,
    ),
    "head_mediation": lambda model, data, **kw: head_mediation(model, data, target="gt", method="exact", limit=2, **kw),
}


class Stopwatch:
    """Total seconds spent in each wrapped function (calls nested inside another counted once)."""

    def __init__(self, targets) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.depth = 0
        for owner, name in targets:
            setattr(owner, name, self._timed(getattr(owner, name), name))

    def _timed(self, fn, name):
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.totals[name] += time.perf_counter() - start

        return timed


def bench(family: str, path: Path, root: Path, reps: int) -> dict:
    model = HookedVLM.from_pretrained(path)
    data = SyntheticLocalization(4, seed=0, image_sizes=((640, 480),))
    stopwatch = Stopwatch(BOOKKEEPING)
    results = {}
    for name, experiment in EXPERIMENTS.items():
        fresh = itertools.count()
        complete = root / f"{family}-{name}-complete"
        experiment(model, data, run=complete, progress=False)
        t = interleaved(
            {
                "memory": lambda: experiment(model, data, progress=False),
                "recorded": lambda: experiment(model, data, run=root / f"{family}-{name}-{next(fresh)}", progress=False),
                "rerun": lambda: experiment(model, data, run=complete, progress=False),
            },
            reps,
        )
        stopwatch.totals.clear()  # one recorded run, timed function by function
        experiment(model, data, run=root / f"{family}-{name}-timed", progress=False)
        bookkeeping = sum(stopwatch.totals.values())
        n_items = json.loads((complete / "manifest.json").read_text())["items"]["count"]
        results[name] = {
            "items": n_items,
            "memory_s": t["memory"],
            "recorded_s": t["recorded"],
            "rerun_s": t["rerun"],
            "bookkeeping_s": bookkeeping,
            "bookkeeping_by_function_s": dict(stopwatch.totals),
            "bookkeeping_over_memory": bookkeeping / t["memory"],
            "recorded_over_memory": t["recorded"] / t["memory"],
            "rerun_over_memory": t["rerun"] / t["memory"],
        }
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in results[name].items() if not isinstance(v, dict))
        print(f"{family} {name}: {figures}", flush=True)
    return results


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    size = "quick" if args.quick else "mid"
    out = Path(__file__).parent / ("runs_overhead_quick.json" if args.quick else "runs_overhead.json")
    torch.manual_seed(0)
    results = {"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llava", "internvl"):
            results[family] = bench(family, build(family, size, Path(tmp)), Path(tmp), args.reps or (2 if args.quick else 3))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(results))


def table(results: dict) -> str:
    header = ("| family | experiment | items | in memory s | recorded / in memory | rerun of a complete run / in memory "
              "| bookkeeping / in memory (target < 2%) |")  # fmt: skip
    lines = [f"{results['size']} models, {results['threads']} threads, torch {results['torch']}", "", header, "|---" * 7 + "|"]
    for family in ("llava", "internvl"):
        for name, r in results[family].items():
            lines.append(f"| {family} | {name} | {r['items']} | {r['memory_s']:.2f} | {r['recorded_over_memory']:.3f} | "
                         f"{100 * r['rerun_over_memory']:.2f}% | {100 * r['bookkeeping_over_memory']:.2f}% |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
