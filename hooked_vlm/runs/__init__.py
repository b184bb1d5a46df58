"""Long runs: rows recorded as they are produced, resumed after a crash, shared by the processes
of `accelerate launch` (or `torchrun`) and merged — one mechanism for every experiment.

    from hooked_vlm.experiments import token_ablation
    table = token_ablation(model, data)                            # in memory, as always
    table = token_ablation(model, data, run="results/ablation")    # recorded; rerun to resume
    table = token_ablation(model, data, run=Run("results/ablation", overwrite=True))  # start again

On the command line every experiment runs in its `--out` folder this way (`--overwrite` starts
again); `accelerate launch -m hooked_vlm <experiment> ...` shares it between processes.

Guarantees. Each process appends one line per completed item to its own shard file and fsyncs it,
so a SIGKILL at any moment loses at most the batch in flight (a torn last line is detected by its
checksum and dropped, never read as a row), and a rerun of the same command computes only the
items without a record: never twice, never a duplicate row. A rerun into a directory made with
other arguments, settings, model, dtype or data is an error naming what differs. Under a launcher
every process takes a deterministic share of the pending items (whole groups, round-robin), the
main process waits for the others (accelerate's `PartialState` barrier) and every process returns
the merged table, in the work's item order: the table a single process gives. The caller writes
its outputs from it, on the main process (`Run.is_main`), through `write_atomically`.

How an experiment uses runs
---------------------------
An experiment stays a function of (model, data) that yields rows; it describes its work as a
`Work` and hands it to `execute`, which runs it in memory (`run=None`) or in a run directory:

    def my_experiment(model, dataset, *, strength=1.0, batch_size=8, limit=None, progress=True, run=None):
        sources = sample_sources(dataset, limit)              # (sample id, loader): no image loaded
        conditions = ["baseline", "ablated"]
        items = [Item(f"{c}|{sid}", group=sid, payload=(c, load)) for c in conditions for sid, load in sources]

        def compute(pending):                                  # this process's pending items, in order
            for batch in batched(pending, batch_size):         # batch the pending samples for speed
                rows = answer(model, [item.payload for item in batch], strength)
                yield from ((item.key, [row]) for item, row in zip(batch, rows))   # recorded at once

        work = Work("my_experiment", items, compute, settings={"strength": strength, "limit": limit}, model=model)
        return execute(work, run, progress=progress)

- `Item.key` must be stable across reruns of the same command and unique (a condition name and a
  sample id); `Item.group` keeps items that share work on one process (a sample's conditions).
- `compute` may batch as it likes but yields each item's rows (a list of dicts of plain values:
  None, bool, int, float, str, tuples, lists) as soon as that item is complete.
- `settings` holds every value that changes a row (resolved defaults included; batch size and
  progress excluded): the manifest records it, and a resume with other settings is refused.
- `Work.table` turns the rows of every item (in item order) into the public DataFrame; the
  default concatenates them.
- A step that needs another run first (a ranking from head mediation) runs it in
  `run.child("name")`, itself resumable.
"""

from hooked_vlm.runs.files import atomic_path, write_atomically
from hooked_vlm.runs.manifest import MANIFEST, describe, describe_ids
from hooked_vlm.runs.launch import is_main_process, launched_processes, process_device, processes
from hooked_vlm.runs.records import RunBusy
from hooked_vlm.runs.run import Run, RunMismatch, execute, merged
from hooked_vlm.runs.work import Item, Work

__all__ = [
    "MANIFEST",
    "Item",
    "Run",
    "RunBusy",
    "RunMismatch",
    "Work",
    "atomic_path",
    "describe",
    "describe_ids",
    "execute",
    "is_main_process",
    "launched_processes",
    "merged",
    "process_device",
    "processes",
    "write_atomically",
]
