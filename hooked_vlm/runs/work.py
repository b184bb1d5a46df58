"""What an experiment hands the run module: its items, and how to compute the rows of some of them."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Item:
    """One unit of resumable work.

    `key` is what the shard files record: the same for the same command on the same data, and
    unique within the work (e.g. "object+1|test-3": a condition and a sample id). Items of one
    `group` go to the same process (e.g. one sample under every condition, so that its image is
    loaded and its attributions computed once). `payload` is whatever `compute` needs to do the
    item (a condition, a sample loader); it is never recorded."""

    key: str
    group: str
    payload: Any = field(default=None, compare=False, repr=False)


# (the pending items, in the work's order) -> (key, rows) for each item, as soon as it is complete
Compute = Callable[[list[Item]], Iterable[tuple[str, list[dict]]]]
# the rows of every item, in the work's item order -> the experiment's public table
Table = Callable[[list[list[dict]]], pd.DataFrame]


def concatenated(rows_per_item: list[list[dict]]) -> pd.DataFrame:
    """The default table: every row, in item order."""
    return pd.DataFrame([row for rows in rows_per_item for row in rows])


@dataclass
class Work:
    """An experiment's work, ready to run in memory, or resumed and sharded in a run directory.

    `settings` are the experiment's resolved settings (every value that changes a row: defaults
    included, batch sizes and progress bars excluded); they go to the run manifest and must match
    when a run is resumed. `model` is described in the manifest (architecture, dtype,
    preprocessing) and compared the same way. `desc` and `unit` label the progress bar."""

    name: str
    items: list[Item]
    compute: Compute
    table: Table = concatenated
    settings: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    desc: str = ""
    unit: str = "item"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.items:
            if item.key in seen:
                raise ValueError(
                    f"{self.name}: two items share the key {item.key!r}; every sample needs its own id "
                    "(does the dataset list one sample twice?)"
                )
            seen.add(item.key)


_computing = contextvars.ContextVar("hooked_vlm_runs_computing", default=False)


@contextlib.contextmanager
def computing() -> Iterator[None]:
    """Marks the work being computed, so that the experiments it calls on one batch (an
    in-memory `evaluate`) are known to be part of it."""
    token = _computing.set(True)
    try:
        yield
    finally:
        _computing.reset(token)


def is_computing() -> bool:
    return _computing.get()


def computed(work: Work, items: list[Item], *, progress: bool, desc: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """`work.compute(items)`, checked: each item given comes back once, and no other. The bar
    counts these items only: the work left, not the whole. No item: `compute` is not called."""
    if not items:
        return
    wanted = {item.key for item in items}
    bar = tqdm(total=len(items), desc=desc or work.desc or work.name, unit=work.unit, disable=not progress)
    try:
        for key, rows in work.compute(items):
            if key not in wanted:
                raise RuntimeError(f"{work.name} computed item {key!r}, which it was not asked for (or twice)")
            wanted.remove(key)
            yield key, rows
            bar.update(1)
    finally:
        bar.close()
    if wanted:
        raise RuntimeError(f"{work.name} did not compute {len(wanted)} of the items it was given, e.g. {sorted(wanted)[:3]}")


def run_in_memory(work: Work, *, progress: bool) -> pd.DataFrame:
    """Every item computed in this process, nothing written: the experiments' plain call."""
    with computing():
        rows = dict(computed(work, work.items, progress=progress))
    return work.table([rows[item.key] for item in work.items])
