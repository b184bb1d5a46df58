"""A run directory: the manifest, one shard of rows per process, and the outputs made from them.

    out/
      manifest.json            what made the rows (see `manifest`), one entry per launch
      rows/shard-00000.jsonl   process 0's records, one line per completed item (see `records`)
      rows/shard-00001.jsonl   ...
      results.csv ...          written by the caller, from the merged table, on the main process

A launch: every process locks its own shard, reads the manifest and the records, and stops with
the same error if the directory was made otherwise; the main process writes the manifest (after
clearing the directory with `overwrite`); every process computes its share of the pending items,
appending each as it completes; after a barrier every process reads all shards and returns the
merged table, in the work's item order.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from tqdm.auto import tqdm

from hooked_vlm.runs.files import atomic_path
from hooked_vlm.runs.manifest import (
    COMPARED, FORMAT, MANIFEST, RunMismatch, describe, describe_ids, differences, launch_record, normalised, run_tag,
)  # fmt: skip
from hooked_vlm.provenance import model_identity
from hooked_vlm.runs.launch import is_main_process, launched_processes, processes
from hooked_vlm.runs.records import ROWS, Shard, read_records, shard_files
from hooked_vlm.runs.work import Work, computed, computing, is_computing, run_in_memory


class Run:
    """Where an experiment's rows go, so that it can resume after a crash and be shared by the
    processes of a launch. `arguments`: what the caller was asked (the command line), recorded
    and compared on resume. `overwrite`: clear the run's files first instead of resuming.
    `outputs`: the files the caller writes from the merged table (cleared by `overwrite`; found
    without a manifest, they are an error rather than silently replaced). `launch`: recorded per
    launch, never compared (batch size, device). `model_name`: the model's name or path."""

    def __init__(
        self,
        directory: str | Path,
        *,
        arguments: dict[str, Any] | None = None,
        overwrite: bool = False,
        outputs: Sequence[str] = (),
        model_name: str | None = None,
        launch: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.arguments = dict(arguments or {})
        self.overwrite = overwrite
        self.outputs = tuple(outputs)
        self.model_name = model_name
        self.launch = dict(launch or {})

    @classmethod
    def from_command_line(
        cls, args, *, outputs: Sequence[str] = (), paths: Sequence[str] = (), launch: Sequence[str] = ("batch_size", "device")
    ) -> Run:
        """The run of a command (an argparse namespace with `out`, `overwrite`, `model`): its
        arguments are every option but `launch` ones (they do not change a row: recorded per launch,
        free to change on resume); the `paths` options that name local files are made absolute (a
        resume from another folder must name the same files)."""
        skipped = {"command", "run", "out", "overwrite", *launch}
        arguments = {"command": args.command} | {k: v for k, v in vars(args).items() if k not in skipped}
        for name in paths:
            if isinstance(arguments.get(name), str) and Path(arguments[name]).exists():
                arguments[name] = str(Path(arguments[name]).resolve())
        return cls(args.out, arguments=arguments, overwrite=args.overwrite, outputs=outputs, model_name=arguments.get("model"),
                   launch={name: getattr(args, name) for name in launch})  # fmt: skip

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, overwrite={self.overwrite})"

    @property
    def is_main(self) -> bool:
        """Whether this process writes the outputs (process 0 of a launch)."""
        return is_main_process()

    def child(self, name: str, outputs: Sequence[str] = ()) -> Run:
        """A run in a subfolder with the same arguments, e.g. the head mediation a cumulative
        ablation ranks its heads by."""
        return Run(self.directory / name, arguments=self.arguments, overwrite=self.overwrite, outputs=outputs,
                   model_name=self.model_name, launch=self.launch)  # fmt: skip

    def check_arguments(self) -> None:
        """Fail now, before any model is loaded, if the directory was made with other arguments."""
        if self.overwrite:
            return
        recorded = self._recorded()
        if recorded is None:
            self._check_no_stale_files()
            return
        self._raise_on(differences(recorded, {"arguments": self.arguments}, ("arguments",)))

    # ------------------------------------------------------------------------------ a launch
    def execute(self, work: Work, *, progress: bool = True) -> pd.DataFrame:
        group = processes(cpu=_on_cpu(work.model))
        shard = Shard(self.directory / ROWS, group.index)
        with shard.locked():
            recorded = None if self.overwrite else self._recorded()
            current = self._identity(work)
            self._check_resumable(recorded, current)
            # a resumed run keeps the identity it was recorded with (equal but for `WHEN` keys), and its tag
            identity = current if recorded is None else {section: recorded.get(section) for section in COMPARED}
            tag = run_tag(identity)
            done = set() if recorded is None else set(read_records(self.directory / ROWS, tag))
            pending = [item for item in work.items if item.key not in done]
            group.wait()  # every process has read the directory before the main one changes it
            if group.is_main:
                if self.overwrite:
                    self._clear()
                launches = [] if recorded is None else recorded.get("launches", [])
                launch = launch_record(group.count, len(pending), self.launch)
                self._write_manifest(identity | {"launches": [*launches, launch]})
            group.wait()
            if not group.is_main:
                self._check_same_as_main(current, group.index)
            mine = group.share(pending)
            desc = _describe(work, len(work.items) - len(pending), group, progress)
            with shard.appending(tag) as writer, computing():
                for key, rows in computed(work, mine, progress=progress and group.is_main, desc=desc):
                    writer.append(key, rows)
            group.wait()  # the main process merges once every share is recorded
        return merged(work, read_records(self.directory / ROWS, tag))

    def _identity(self, work: Work) -> dict[str, Any]:
        model = model_identity(work.model, self.model_name) if work.model is not None else None
        return {
            "format": FORMAT,
            "experiment": work.name,
            "arguments": describe(self.arguments),
            "settings": describe(work.settings),
            "model": model,
            "items": describe_ids([item.key for item in work.items]),
        }

    def _check_resumable(self, recorded: dict | None, current: dict[str, Any]) -> None:
        if self.overwrite:
            return
        if recorded is None:
            self._check_no_stale_files()
            return
        self._raise_on(differences(recorded, current))

    def _check_same_as_main(self, current: dict[str, Any], index: int) -> None:
        """Every process of a launch must compute the run the main process recorded (same
        arguments, settings, model and items), or their shards could not be merged: said now,
        naming what differs, rather than after the work."""
        lines = differences(self._recorded() or {}, current)
        if lines:
            shown = "\n  ".join(lines[:12])
            raise RunMismatch(f"process {index} of this launch does not compute the run its main process recorded in "
                              f"{self.directory / MANIFEST}:\n  {shown}")  # fmt: skip

    def _recorded(self) -> dict[str, Any] | None:
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as error:  # written atomically, so only a hand edit gets here
            raise RunMismatch(f"{path} is not a readable run manifest ({error}); {_remedy()}") from None

    def _raise_on(self, lines: list[str]) -> None:
        if lines:
            shown = "\n  ".join(lines[:12]) + (f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else "")
            raise RunMismatch(f"{self.directory} holds a run made otherwise:\n  {shown}\nRerun with the recorded "
                              f"arguments to resume it, {_remedy()}")  # fmt: skip

    def _check_no_stale_files(self) -> None:
        found = [name for name in self.outputs if (self.directory / name).exists()]
        found += [f"{ROWS}/{p.name}" for p in shard_files(self.directory / ROWS)]
        if found:
            raise RunMismatch(
                f"{self.directory} holds {', '.join(found)} but no run manifest (written by an older hooked_vlm, "
                f"or by hand): nothing says which arguments made them; {_remedy()}"
            )

    def _clear(self) -> None:
        for path in [self.directory / MANIFEST, *shard_files(self.directory / ROWS)]:
            path.unlink(missing_ok=True)
        for name in self.outputs:
            (self.directory / name).unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        with atomic_path(self.directory / MANIFEST) as tmp:
            tmp.write_text(json.dumps(normalised(manifest), indent=1) + "\n")


def _remedy() -> str:
    return "choose another output folder, or overwrite it (--overwrite; overwrite=True) to start again"


def _on_cpu(model) -> bool:
    return model is None or model.device.type == "cpu"


def _describe(work: Work, n_done: int, group, progress: bool) -> str:
    """The progress bar's label (the bar, on the main process, counts that process's share of
    the items left)."""
    desc = work.desc or work.name
    if group.count > 1:
        desc += f" [process 0 of {group.count}]"
    if n_done:
        desc += f" ({n_done} of {len(work.items)} done before)"
        if progress and group.is_main:
            tqdm.write(f"{work.name}: resuming, {n_done} of {len(work.items)} items already recorded")
    return desc


def merged(work: Work, records: dict[str, list[dict]]) -> pd.DataFrame:
    """The public table of `work` from every item's recorded rows, in the work's item order."""
    missing = [item.key for item in work.items if item.key not in records]
    if missing:
        raise RuntimeError(
            f"{work.name}: {len(missing)} of {len(work.items)} items have no record (e.g. {missing[:3]}): a process "
            "stopped before finishing its share; run the same command again to compute them"
        )
    return work.table([records[item.key] for item in work.items])


def execute(work: Work, run: Run | str | Path | None = None, *, progress: bool = True) -> pd.DataFrame:
    """The door: `work` computed in memory (`run=None`), or in a run directory, resumed and
    shared by the processes of a launch (`run`: a `Run`, or a directory for `Run(directory)`)."""
    if run is None:
        if launched_processes() > 1 and not is_computing():
            warnings.warn(
                f"{work.name} runs on {launched_processes()} processes without a run directory: every process "
                "computes every item. Pass run=<directory> to share the work.",
                stacklevel=3,
            )
        return run_in_memory(work, progress=progress)
    run = run if isinstance(run, Run) else Run(run)
    return run.execute(work, progress=progress)
