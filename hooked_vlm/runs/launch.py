"""The processes of a launch: one without a launcher; under `accelerate launch` or `torchrun`,
the group accelerate's `PartialState` joins (its barrier is how the main process waits for the
others before merging).

    accelerate launch --num_processes 4 -m hooked_vlm token-ablation ... --device cuda   # a GPU each
    accelerate launch --multi_gpu --num_processes 2 -m hooked_vlm ... --device cpu     # 2 CPU processes
    torchrun --nproc_per_node 2 -m hooked_vlm ...

(`accelerate launch --cpu` starts one process unless MPI is set up: for several CPU processes use
`--multi_gpu` with `--device cpu`, or torchrun; the group then talks over gloo.)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

from hooked_vlm.runs.work import Item

# A barrier waits for the slowest share of a run that may last days; torch's default timeout
# (minutes) would stop a healthy run whose shares end an hour apart. A process that dies is
# noticed by the launcher, which stops the others.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def launched_processes() -> int:
    """How many processes the launcher started (accelerate and torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str) -> str:
    """This process's device: under a multi-process launch, "cuda" means the process's own GPU
    (cuda:<local rank>); any other device (an explicit "cuda:1", "cpu") is kept."""
    if launched_processes() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    state: Any = None  # accelerate's PartialState, under a launcher

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This process's items: whole groups, dealt round-robin in the order they first appear,
        so every process computes its share from the same pending list the same way."""
        groups = list(dict.fromkeys(item.group for item in items))
        mine = set(groups[self.index :: self.count])
        return [item for item in items if item.group in mine]


def processes(*, cpu: bool) -> Processes:
    """The processes of this launch. `cpu`: the work runs on CPU, so the group talks over gloo
    (without it accelerate would set no group up on a machine without GPUs, and every process
    would do all the work)."""
    expected = launched_processes()
    if expected <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if state.num_processes != expected:
        raise RuntimeError(
            f"the launcher started {expected} processes, but accelerate joined a group of {state.num_processes} "
            f"(distributed type {state.distributed_type}); set up accelerate for this machine (`accelerate config`)"
        )
    return Processes(state.process_index, state.num_processes, state)
