"""`calibrate_frame`: which frame does a LLaVA checkpoint write its boxes in? (PROTOCOL-AUDIT B1,
PAPER_PROTOCOL §1.11.1.)

LLaVA-1.5 writes boxes as fractions, but of what: the padded square it saw ("padded"), the
original image ("original", as RefCOCO's annotations are), or in crop mode the centre crop
("crop")? The protocol calls this disputed and recommends choosing per model by baseline IoU on a
calibration split. The model's answers do not depend on the frame, only their reading does, so
the answers are generated once and scored under every frame; the best mean localization score
wins. Use the chosen frame (`frame=` of every experiment, `--frame`) on *other* samples than the
calibration split, or the choice is fitted to the evaluated samples.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from hooked_vlm.boxes import Frame
from hooked_vlm.experiments.data import SampleMode
from hooked_vlm.experiments.evaluate import box_format, evaluate
from hooked_vlm.scoring import score_localization_answer

FRAMES: tuple[Frame, ...] = ("padded", "original", "crop")


def calibrate_frame(
    model,
    dataset: Any,
    *,
    n: int = 200,
    frames: Sequence[Frame] | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Frame, pd.DataFrame]:
    """(the frame with the best baseline localization score on `n` samples of `dataset`, one
    row per frame: `frame`, `loc_score`, `parsed`, `n`). `frames`: the candidates (default: the
    padded square and the original image in pad mode, the crop and the original in crop mode).
    The table's `attrs["sample_ids"]` lists the calibration samples."""
    if model.cfg.family != "llava":
        raise ValueError(f"only LLaVA's box frame is in question; a {model.cfg.family} model writes boxes over the original image")
    crop_mode = model.preprocessing.image_mode == "crop"
    frames = list(frames or (("crop", "original") if crop_mode else ("padded", "original")))
    unknown = [f for f in frames if f not in FRAMES]
    if unknown or not frames:
        raise ValueError(f"unknown frames {unknown}; expected some of {FRAMES}")
    answers = evaluate(model, dataset, "localization", limit=n, sample=sample, sample_seed=sample_seed, batch_size=batch_size,
                       progress=progress)  # fmt: skip
    answers = answers[answers["excluded"].isna()]
    rows = []
    for frame in frames:
        boxes = box_format(model, frame)
        scored = [score_localization_answer(r.response, r.gt_box, (r.image_width, r.image_height), **boxes)
                  for r in answers.itertuples()]  # fmt: skip
        rows.append({"frame": frame, "loc_score": sum(s["loc_score"] for s in scored) / max(len(scored), 1),
                     "parsed": sum(s["pred_box"] is not None for s in scored) / max(len(scored), 1), "n": len(scored)})  # fmt: skip
    table = pd.DataFrame(rows).set_index("frame")
    table.attrs["sample_ids"] = list(answers["sample_id"])
    return table["loc_score"].idxmax(), table
