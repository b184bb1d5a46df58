"""The control set (PAPER_PROTOCOL §1.2): the object / object-removed pairs that every model
recognises in the original image and misses in its twin.

    pairs = pair_with_removed(load_coco("instances_val2017.json", "val2017/"), "removed/")
    control = build_control_set(["llava-hf/llava-1.5-7b-hf", "OpenGVLab/InternVL3_5-8B-HF"], pairs,
                                out="control.json", dtype=torch.bfloat16, device="cuda")
    control.verdicts()                    # one row per pair and model: answers, verdicts, why dropped
    pairs = control.select(pairs)         # the kept pairs, in the manifest's order

The rule (the paper's): a model *recognises* the object when the list prompt's answer names its
class (`evaluate`'s `correct`), or, with `task="binary"`, when it answers yes; a pair is kept for
a model when it recognises the object in the original and not in the twin, and the control set
is the intersection over the models. Verdicts are `evaluate`'s rows, under the preprocessing
given (`preprocessing`: overrides of `model.preprocessing`, e.g. {"image_mode": "pad"}, or a
function of the model for several families), which the manifest records with each model's
identity. Models given by name are loaded one at a time. With `out`, each model's verdicts are
kept beside the manifest as soon as they are known (`<out>.partial.json`), so a rerun of the same
call after a crash starts at the model it was on.

Every experiment subcommand takes the manifest (`--pairs control.json`): its data are the kept
annotations, in the manifest's order (`control_set_dataset`).
"""

from __future__ import annotations

import datetime
import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hooked_vlm.data.coco import CocoSubset, ObjectRemovedPairs, pair_with_removed
from hooked_vlm.provenance import Preprocessing, code_version, model_identity, with_preprocessing
from hooked_vlm.runs.files import write_file_atomically

FORMAT = "hooked_vlm control set"
FORMAT_VERSION = 1
TASKS = ("list", "binary")
NO_TWIN = "no object-removed image"
MISSED = "missed in the original"
STILL_SEEN = "still recognised without the object"


@dataclass
class ControlSet:
    """A control-set manifest (see the module docstring) and where it was read from."""

    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def kept_annotation_ids(self) -> list[int]:
        return [entry["annotation_id"] for entry in self.manifest["kept"]]

    @property
    def model_names(self) -> list[str]:
        return [model["name"] for model in self.manifest["models"]]

    def verdicts(self) -> pd.DataFrame:
        """One row per pair and model: ids, class, the model's answers and verdicts, whether the
        model keeps the pair, and the pair's outcome over all models (`kept`, `reason`)."""
        rows = []
        for pair in self.manifest["pairs"]:
            common = {k: pair[k] for k in ("annotation_id", "image_id", "class_name", "kept", "reason")}
            for model, verdict in pair["verdicts"].items():
                rows.append(common | {"model": model} | {f"model_{k}" if k in common else k: v for k, v in verdict.items()})
        return pd.DataFrame(rows)

    def select(self, dataset: Sequence) -> Sequence:
        """The kept annotations of `dataset` (a `CocoSubset`, `ObjectRemovedPairs` or a list of
        their items), in the manifest's order and of the same type. An annotation of the manifest
        missing from `dataset`, or one whose image or class differ, is a ValueError (another
        annotation file, or other filters)."""
        by_id = {_annotation(x).annotation_id: x for x in dataset}
        missing = [entry["annotation_id"] for entry in self.manifest["kept"] if entry["annotation_id"] not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} annotations of the control set {self.path or ''} are not in the data "
                             f"(another annotation file, or other filters?): {missing[:5]}")  # fmt: skip
        selected = []
        for entry in self.manifest["kept"]:
            item = by_id[entry["annotation_id"]]
            found = (_annotation(item).image_id, _annotation(item).class_name)
            if found != (entry["image_id"], entry["class_name"]):
                raise ValueError(f"annotation {entry['annotation_id']} is ({found[0]}, {found[1]!r}) in the data but "
                                 f"({entry['image_id']}, {entry['class_name']!r}) in the control set: another annotation file")  # fmt: skip
            selected.append(item)
        if isinstance(dataset, ObjectRemovedPairs):
            return ObjectRemovedPairs(selected, dataset.class_names)
        if isinstance(dataset, CocoSubset):
            return CocoSubset(selected, dataset.report, dataset.categories)
        return selected


def _annotation(item):
    return getattr(item, "item", item)  # an ObjectRemovedPair wraps its CocoItem


def load_control_set(path: str | Path) -> ControlSet:
    manifest = json.loads(Path(path).read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a control-set manifest ({FORMAT!r} version {FORMAT_VERSION}); make one with hooked-vlm control-set")
    return ControlSet(manifest, Path(path))


def build_control_set(
    models: Sequence[Any],
    data: Sequence,
    removed_dir: str | Path | None = None,
    *,
    task: str = "list",
    preprocessing: Preprocessing = None,
    out: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> ControlSet:
    """The control set of `models` (names loaded with `dtype` and `device`, or `HookedVLM`s) on
    `data`: a `CocoSubset` paired with the twins in `removed_dir`, or `ObjectRemovedPairs`
    (see the module docstring). `source` (e.g. the annotation file and image folder) is recorded
    as the manifest's `data`. With `out`, the manifest is written there (JSON)."""
    from hooked_vlm.experiments.evaluate import MAX_NEW_TOKENS

    if task not in TASKS:
        raise ValueError(f"the control set's task must be one of {TASKS} (a model always answers a box), got {task!r}")
    if not models:
        raise ValueError("the control set needs at least one model")
    candidates = list(data)
    pairs = pair_with_removed(data, removed_dir) if removed_dir is not None else data
    if not isinstance(pairs, ObjectRemovedPairs):
        raise TypeError("pass COCO items with removed_dir, or the ObjectRemovedPairs of pair_with_removed")
    arguments = {"task": task, "max_new_tokens": max_new_tokens or MAX_NEW_TOKENS[task], "batch_size": batch_size,
                 "removed_dir": str(removed_dir) if removed_dir is not None else None,
                 "preprocessing": _describe_preprocessing(preprocessing), "dtype": str(dtype).removeprefix("torch."),
                 "device": str(device)}  # fmt: skip
    # a rerun reuses a finished model's verdicts only when everything that made them is the same
    partial = _Partial(out, arguments | {"candidates": [_annotation(c).annotation_id for c in candidates]})
    records = []
    for given in models:
        name = given if isinstance(given, (str, Path)) else getattr(given, "name_or_path", None)
        if name is not None and str(name) in partial.done:
            records.append(partial.done[str(name)])
            continue
        model = _load(given, dtype, device)
        with with_preprocessing(model, preprocessing) as settings:
            verdicts = model_verdicts(model, pairs, task, arguments["max_new_tokens"], batch_size, progress)
            # inside the block: the identity's prompt settings are the ones the verdicts were made under
            record = model_identity(model) | {"preprocessing": settings, "verdicts": verdicts}
        records.append(partial.add(record))
        del model
        _release()
    names = [record["name"] for record in records]
    if len(set(names)) < len(names):
        raise ValueError(f"the models must differ; got {names}")
    manifest = _manifest(candidates, pairs, records, arguments, source)
    control = ControlSet(manifest, Path(out) if out else None)
    if out is not None:
        _write_json(Path(out), manifest)
        partial.clear()
    return control


def model_verdicts(model, pairs: ObjectRemovedPairs, task: str, max_new_tokens: int, batch_size: int = 8,
                   progress: bool = True) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Per annotation id: does `model` recognise the object in the original and in the twin,
    and its answers, read off `evaluate`'s rows."""
    from hooked_vlm.experiments.evaluate import evaluate

    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    ids: dict[str, int] = {}
    if task == "binary":  # evaluate asks about the original and the twin of each sample
        rows = evaluate(model, _samples(pairs, ids, twin=False), "binary", condition="control set", **options)
        recognised = rows["answer"].map(lambda answer: answer is not None and answer == True)  # noqa: E712 (numpy bools)
        original, removed = rows[rows["image"] == "original"], rows[rows["image"] == "removed"]
        original_seen, removed_seen = recognised[original.index], recognised[removed.index]
    else:
        original = evaluate(model, _samples(pairs, ids, twin=False), "list", condition="original", **options)
        removed = evaluate(model, _samples(pairs, ids, twin=True), "list", condition="object removed", **options)
        original_seen, removed_seen = original["correct"], removed["correct"]
    verdicts = {}
    for sample_id, seen, response in zip(original["sample_id"], original_seen, original["response"]):
        verdicts[ids[sample_id]] = {"original_recognised": bool(seen), "original_response": response}
    for sample_id, seen, response in zip(removed["sample_id"], removed_seen, removed["response"]):
        verdict = verdicts[ids[sample_id]] | {"removed_recognised": bool(seen), "removed_response": response}
        kept = verdict["original_recognised"] and not verdict["removed_recognised"]
        verdicts[ids[sample_id]] = verdict | {"kept": kept, "reason": None if kept else MISSED if not verdict["original_recognised"] else STILL_SEEN}
    return verdicts


def _samples(pairs: ObjectRemovedPairs, ids: dict[str, int], twin: bool):
    """The pairs' samples, one at a time (images are loaded lazily), noting each sample id's
    annotation; `twin`: the sample shows the object-removed image instead of the original."""
    from hooked_vlm.experiments.data import as_samples

    for pair, sample in zip(pairs, as_samples(pairs)):
        ids[sample.id] = pair.item.annotation_id
        yield replace(sample, image=sample.removed_image) if twin else sample


def _describe_preprocessing(preprocessing: Preprocessing) -> Any:
    """The overrides as asked (a function by its name; each model's settings in force are in
    the manifest's `models`)."""
    if callable(preprocessing):
        return f"{getattr(preprocessing, '__module__', '')}.{getattr(preprocessing, '__qualname__', repr(preprocessing))}"
    return dict(preprocessing or {})


def _load(given, dtype, device):
    if isinstance(given, (str, Path)):
        from hooked_vlm.model import HookedVLM

        return HookedVLM.from_pretrained(given, dtype=dtype, device=device)
    return given


def _release() -> None:
    """Free a model's memory before the next is loaded (three 7-13B models do not fit at once)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _manifest(candidates, pairs, records, arguments, source) -> dict[str, Any]:
    twins = {pair.item.annotation_id: pair.removed_image_path.name for pair in pairs}
    entries = []
    for candidate in map(_annotation, candidates):
        ann = candidate.annotation_id
        verdicts = {record["name"]: record["verdicts"][ann] for record in records if ann in record["verdicts"]}
        dropped = [f"{name}: {v['reason']}" for name, v in verdicts.items() if not v["kept"]]
        reason = NO_TWIN if ann not in twins else "; ".join(dropped) or None
        entries.append({"annotation_id": ann, "image_id": candidate.image_id, "class_name": candidate.class_name,
                        "removed_image": twins.get(ann), "kept": reason is None, "reason": reason, "verdicts": verdicts})  # fmt: skip
    kept = [{k: e[k] for k in ("annotation_id", "image_id", "class_name")} for e in entries if e["kept"]]
    models = []
    for record in records:
        outcomes = [v["reason"] for v in record["verdicts"].values()]
        counts = {"kept": outcomes.count(None), "missed_in_original": outcomes.count(MISSED), "recognised_without_object": outcomes.count(STILL_SEEN)}
        models.append({k: v for k, v in record.items() if k != "verdicts"} | {"counts": counts})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hooked_vlm": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rule": "a pair is kept when every model recognises the object in the original and not in the object-removed image",
        "arguments": arguments, "data": source or {}, "models": models,
        "counts": {"candidates": len(entries), "with_removed_image": len(twins), "kept": len(kept),
                   "kept_images": len({e["image_id"] for e in kept})},
        "kept": kept, "pairs": entries,
    }  # fmt: skip


class _Partial:
    """Each finished model's verdicts, kept in `<out>.partial.json` until the manifest is written;
    reused by a rerun with the same arguments and candidates."""

    def __init__(self, out: str | Path | None, key: dict[str, Any]):
        self.path = Path(f"{out}.partial.json") if out is not None else None
        self.key = key
        self.done: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("key") == key:
                self.done = {r["name"]: r | {"verdicts": {int(k): v for k, v in r["verdicts"].items()}} for r in saved["models"]}

    def add(self, record: dict) -> dict:
        self.done[record["name"]] = record
        if self.path is not None:
            _write_json(self.path, {"key": self.key, "models": list(self.done.values())})
        return record

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def control_set_dataset(path: str | Path, *, coco: str | None = None, images: str | None = None, removed: str | None = None):
    """The kept annotations of the control set at `path`, as `--pairs` gives them to every
    experiment: read from `coco`/`images`/`removed`, or from where the manifest says its data are;
    object-removed pairs when there is a removed folder."""
    from hooked_vlm.data.commands import load_filtered_coco

    control = load_control_set(path)
    data = control.manifest.get("data", {})
    coco, images = coco or data.get("coco"), images or data.get("images")
    removed = removed or control.manifest["arguments"].get("removed_dir")
    if not coco or not images:
        raise ValueError(f"{path} does not say where its annotations and images are: pass --coco and --images")
    items = load_filtered_coco(coco, images, "none")  # the manifest's ids are the selection
    return control.select(pair_with_removed(items, removed) if removed else items)
