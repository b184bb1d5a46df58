"""Object removal: each selected object inpainted out of its image (PAPER_PROTOCOL §1.2, §1.9).

    from hooked_vlm.data.coco import load_coco, pair_with_removed
    from hooked_vlm.data.removal import remove_objects, LamaInpainter

    subset = load_coco("instances_val2017.json", "val2017/")
    remove_objects(subset, "removed/")                                   # OpenCV (offline default)
    remove_objects(subset, "removed/", inpainter=LamaInpainter())        # LaMa, as the paper
    pairs = pair_with_removed(subset, "removed/")

For every annotation, its mask is dilated by `dilation` pixels (masks hug the object, and its
soft edge and shadow would otherwise survive), the inpainter fills the dilated mask, and the
result is composited back onto the original: every pixel outside the dilated mask is the
original's, byte for byte. The image is written losslessly as `{image_id}_{ann_id}.png`, the
name `pair_with_removed` reads, through a temporary file renamed into place, so a killed run
never leaves a truncated PNG. A rerun skips the annotations already written; `removal.json` in
the output folder records the inpainter and dilation, and a rerun with other settings is an error
unless `overwrite=True` (which redoes the selected annotations).

Inpainters are callables `(image uint8 [H, W, 3], mask bool [H, W]) -> uint8 [H, W, 3]` with a
`settings()` dict; two ship here (see `hooked_vlm.data.inpainters`): `OpenCVInpainter`
(classical Telea / Navier-Stokes, fast, offline) and `LamaInpainter` (the paper's LaMa).
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, UInt8
from PIL import Image
from tqdm.auto import tqdm

from hooked_vlm.data.coco import CocoItem, removed_image_paths
from hooked_vlm.data.inpainters import Inpainter, LamaInpainter, OpenCVInpainter
from hooked_vlm.data.shapes import dilate_mask
from hooked_vlm.provenance import code_version
from hooked_vlm.runs.files import write_file_atomically

DEFAULT_DILATION = 5  # pixels (Chebyshev): LaMa's own object-removal masks are dilated by a few pixels
SETTINGS_FILE = "removal.json"

__all__ = ["remove_objects", "removed_name", "composite", "RemovalReport", "OpenCVInpainter", "LamaInpainter"]


@dataclass
class RemovalReport:
    """What a `remove_objects` run did: annotation ids written, skipped (already there) and
    left out because their mask is empty (nothing to remove)."""

    out_dir: Path
    settings: dict[str, Any]
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    empty_mask: list[int] = field(default_factory=list)


def removed_name(item: CocoItem) -> str:
    """The file name of `item`'s object-removed image (one of the names `pair_with_removed` reads;
    the image id in it lets the reader check the pairing)."""
    return f"{item.image_id}_{item.annotation_id}.png"


def composite(
    original: UInt8[np.ndarray, "height width 3"],
    inpainted: UInt8[np.ndarray, "height width 3"],
    region: Bool[np.ndarray, "height width"],
) -> UInt8[np.ndarray, "height width 3"]:
    """The inpainted pixels inside `region`, the original's everywhere else."""
    if inpainted.shape != original.shape or inpainted.dtype != np.uint8:
        raise ValueError(
            f"the inpainter returned {inpainted.dtype} {inpainted.shape}; expected uint8 {original.shape} (the image's own shape)"
        )
    return np.where(region[..., None], inpainted, original)


def remove_objects(
    data: Sequence[CocoItem],
    out_dir: str | Path,
    *,
    inpainter: Inpainter | None = None,
    dilation: int = DEFAULT_DILATION,
    overwrite: bool = False,
    progress: bool = True,
) -> RemovalReport:
    """Write the object-removed twin of every item of `data` (a `CocoSubset` or any sequence of
    `CocoItem`) to `out_dir` (see the module docstring). `inpainter`: default `OpenCVInpainter()`.
    Images are read once for all their selected objects."""
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0 pixels, got {dilation}")
    inpainter = inpainter or OpenCVInpainter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"inpainter": inpainter.settings(), "dilation": dilation}
    done = _check_settings(out, settings, overwrite)
    report = RemovalReport(out, settings)
    pending = []
    for item in data:
        if item.annotation_id in done:
            report.skipped.append(item.annotation_id)
        else:
            pending.append(item)
    _write_settings(out, settings)
    bar = tqdm(total=len(pending), desc="removing objects", unit="object", disable=not progress)
    for _, group in itertools.groupby(sorted(pending, key=lambda item: item.image_id), key=lambda item: item.image_id):
        group = list(group)
        original = np.asarray(group[0].load_image())
        for item in group:
            region = dilate_mask(item.mask(), dilation)
            if not region.any():
                report.empty_mask.append(item.annotation_id)
            else:
                removed = composite(original, inpainter(original, region), region)
                _save_png_atomically(removed, out / removed_name(item))
                report.written.append(item.annotation_id)
            bar.update(1)
    bar.close()
    if report.empty_mask:
        warnings.warn(f"{len(report.empty_mask)} annotations have an empty mask and were not inpainted: "
                      f"{report.empty_mask[:5]}", stacklevel=2)  # fmt: skip
    return report


def _check_settings(out: Path, settings: dict, overwrite: bool) -> set[int]:
    """The annotation ids already removed in `out` (none with `overwrite`); a folder made with
    other settings is an error unless `overwrite`."""
    done = set(removed_image_paths(out)) if not overwrite else set()
    path = out / SETTINGS_FILE
    if done and path.is_file():
        recorded = json.loads(path.read_text())
        recorded = {key: recorded.get(key) for key in settings}
        if recorded != settings:
            raise ValueError(
                f"{out} holds {len(done)} object-removed images made with {recorded}, not {settings}; "
                "use another folder, or overwrite=True (--overwrite) to redo the selected objects"
            )
    return done


def _write_settings(out: Path, settings: dict) -> None:
    write_file_atomically(out / SETTINGS_FILE, lambda f: f.write(json.dumps(settings | {"hooked_vlm": code_version()}, indent=1).encode()))


def _save_png_atomically(pixels: UInt8[np.ndarray, "height width 3"], path: Path) -> None:
    write_file_atomically(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))
