"""`hooked-vlm reproduce`: the paper's tables and figures on one or more models, in one command,
written as one report with the published numbers beside ours.

    from hooked_vlm.reproduce import reproduce
    reproduce(["llava-hf/llava-1.5-7b-hf", "OpenGVLab/InternVL3_5-8B-HF"], coco="instances_val2017.json",
              images="val2017/", removed="removed/", imagenet="imagenet/val", out="results/",
              pairs="control.json", dtype=torch.bfloat16, device="cuda")

Parts (`only` selects some; `parts.PARTS`): baseline, table1 (token ablation), table2 (shuffle),
table3 (InternVL global vs local), figure1 (object extension), figure3 (attention knockout),
figures4-5 (head mediation and cumulative head ablation). Each model runs under the paper's
prompt settings (`hooked_vlm.prompt_settings.paper_settings`) unless `settings="checkpoint"`.

Layout of `out`: `report.md` and `<part>.csv` (see `report`); per model `<model>/mean_embedding.pt`
(the mean visual embedding over `imagenet`, under the model's settings) and `<model>/<part>/`: one
run directory per experiment (`hooked_vlm.runs`), its figures, and `done.json` once the part is
finished. A killed reproduce resumes where it stopped: a finished part is read back, not rerun, and
an unfinished experiment computes only its missing items. Rerunning into `out` with other
arguments (data, settings, limits, dtype) is refused naming the difference.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from hooked_vlm.experiments.data import sample_sources
from hooked_vlm.reproduce.parts import NEEDS_MEAN, PARTS, Context, slug
from hooked_vlm.reproduce.report import write_report

SETTINGS = ("paper", "checkpoint")

__all__ = ["PARTS", "reproduce"]


def reproduce(
    models: Sequence[str],
    *,
    out: str | Path,
    coco: str | Path | None = None,
    images: str | Path | None = None,
    removed: str | Path | None = None,
    pairs: str | Path | None = None,
    imagenet: str | Path | None = None,
    only: Sequence[str] | None = None,
    settings: str = "paper",
    filters: str = "paper",
    limit: int | None = None,
    imagenet_limit: int | None = None,
    cma_pairs: int = 50,
    ig_steps: int = 50,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Run the selected parts on every model (loaded one at a time) and write the report; returns
    the path of report.md. Data: the control set `pairs` (a `control-set` manifest) read with
    `coco`, `images` and `removed`; or the COCO annotations (`filters`: "paper" or "none") paired
    with their object-removed twins in `removed`. `limit`: N samples of every part, a seeded
    random subset as every experiment draws it (CMA draws `cma_pairs` at random with `seed`). `imagenet`: the image collection the
    mean visual embedding is averaged over (`imagenet_limit` images), needed by table1 and table3."""
    parts = _check(models, only, settings, imagenet)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _data(coco, images, removed, pairs, filters)
    source = {"coco": coco, "images": images, "removed": removed, "pairs": pairs, "imagenet": imagenet, "filters": filters,
              "limit": limit, "imagenet_limit": imagenet_limit, "cma_pairs": cma_pairs, "ig_steps": ig_steps, "seed": seed}  # fmt: skip
    source = {k: str(Path(v).resolve()) if k in ("coco", "images", "removed", "pairs", "imagenet") and v else v for k, v in source.items()}
    # what the samples are, not only where they were read: a control set or annotation file rebuilt
    # at the same path is other data, and a finished part must not be read back for it
    source["data"] = sample_sources(data).data
    ours, described = [], []
    for name in models:
        model = _load(name, settings, dtype, device)
        folder = slug(name)
        arguments = source | {"model": str(name), "settings": settings, "dtype": str(dtype).removeprefix("torch.")}
        ctx = Context(model, data, out / folder, arguments, _mean_reader(model, out / folder, imagenet, imagenet_limit, batch_size, progress),
                      limit=limit, cma_pairs=cma_pairs, ig_steps=ig_steps, seed=seed, batch_size=batch_size, progress=progress)  # fmt: skip
        for part in parts:
            ours += [row | {"part": part, "model": str(name)} for row in _part(ctx, part)]
        described.append(_describe(model, name, folder, settings))
        del model, ctx
        gc.collect()
    return write_report(out, pd.DataFrame(ours, columns=["part", "row", "task", "model", "value", "sd", "n"]), described, parts,
                        {k: v for k, v in source.items() if k in ("pairs", "coco", "images", "removed", "imagenet", "limit")})  # fmt: skip


def _check(models: Sequence[str], only: Sequence[str] | None, settings: str, imagenet) -> list[str]:
    if not models:
        raise ValueError("reproduce needs at least one model")
    if len(set(map(str, models))) < len(models):
        raise ValueError(f"a model is named twice: {list(models)}")
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")
    parts = list(PARTS) if not only else list(only)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if imagenet is None and any(p in NEEDS_MEAN for p in parts):
        raise ValueError(f"{' and '.join(p for p in parts if p in NEEDS_MEAN)} ablate with the mean visual embedding over "
                         "ImageNet val (PAPER_PROTOCOL §1.4): give the image folder (--imagenet), or leave them out (--only)")  # fmt: skip
    return [p for p in PARTS if p in parts]  # in the paper's order


def _data(coco, images, removed, pairs, filters: str):
    from hooked_vlm.data.commands import load_filtered_coco
    from hooked_vlm.data.coco import pair_with_removed

    if pairs is not None:
        from hooked_vlm.data.control_set import control_set_dataset

        return control_set_dataset(pairs, coco=coco, images=images, removed=removed)
    if coco is None or images is None or removed is None:
        raise ValueError("reproduce reads object / object-removed pairs: give coco, images and removed (or a control set, pairs)")
    return pair_with_removed(load_filtered_coco(coco, images, filters), removed)


def _load(name: str, settings: str, dtype, device):
    from hooked_vlm.model import HookedVLM
    from hooked_vlm.prompt_settings import paper_settings

    model = HookedVLM.from_pretrained(name, dtype=dtype, device=device)
    if settings == "paper":
        model.use_settings(paper_settings(model))
    return model


def _part(ctx: Context, part: str) -> list[dict]:
    """The part's rows: read from `done.json` when the part finished before with the same
    arguments, else computed (its runs resume) and recorded there."""
    from hooked_vlm.runs import RunMismatch
    from hooked_vlm.runs.manifest import differences

    done = ctx.folder / part / "done.json"
    if done.exists():
        recorded = json.loads(done.read_text())
        lines = differences(recorded, {"arguments": ctx.arguments}, ("arguments",))
        if lines:
            raise RunMismatch(f"{done.parent} was made otherwise:\n  " + "\n  ".join(lines) + "\nchoose another --out")
        print(f"{ctx.folder.name} {part}: done before, read from {done}")
        return recorded["rows"]
    rows = PARTS[part](ctx)
    if ctx.run(part, "").is_main:
        from hooked_vlm.runs import write_atomically
        from hooked_vlm.runs.manifest import normalised

        payload = json.dumps(normalised({"arguments": ctx.arguments, "rows": rows}), indent=1)
        write_atomically(done, lambda path: path.write_text(payload))
    return rows


def _mean_reader(model, folder: Path, imagenet, limit: int | None, batch_size: int, progress: bool):
    """A function giving the mean visual embedding over `imagenet` under the model's settings:
    read from `folder/mean_embedding.pt` when it was computed there with the same settings and
    images, else computed and saved there (once)."""
    cache: dict[str, Any] = {}

    def mean():
        if "mean" not in cache:
            cache["mean"] = _mean(model, folder / "mean_embedding.pt", imagenet, limit, batch_size, progress)
        return cache["mean"]

    return mean


def _mean(model, path: Path, imagenet, limit: int | None, batch_size: int, progress: bool):
    from hooked_vlm import interventions as iv
    from hooked_vlm.data.collections import describe_collection, open_collection
    from hooked_vlm.provenance import preprocessing_settings
    from hooked_vlm.runs import is_main_process, write_atomically

    images = open_collection(imagenet, limit=limit)
    if path.exists():
        mean = iv.load_mean(path, model)  # refuses another model's
        used, now = mean.provenance.get("images", {}), describe_collection(images)
        same_images = all(used.get(k) == v for k, v in now.items() if k in used)  # source, count (hashes differ in kind)
        if mean.provenance.get("preprocessing") == preprocessing_settings(model) and same_images:
            return mean
        raise ValueError(f"{path} was computed with other settings or images than this run's; delete it or choose another --out")
    mean = iv.compute_mean_embedding(model, images, batch_size=batch_size, progress=progress)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        iv.save_mean(mean, path)
    return mean


def _describe(model, name: str, folder: str, settings: str) -> dict[str, Any]:
    from hooked_vlm.prompt_settings import effective_settings
    from hooked_vlm.reproduce.paper import paper_model

    label = "the paper's" if settings == "paper" else "the checkpoint's own"
    return {"name": str(name), "folder": folder, "paper": paper_model(name), "settings_label": label,
            "settings": effective_settings(model)}  # fmt: skip
