"""`object_extension`: does the predicted box follow the object's token extent? (PAPER_PROTOCOL
§1.5, Figure 1.)

Each object is grown by `p` token rings filled with random copies of its own tokens
(`interventions.object_extension`, at `hook_inputs_embeds`; the thumbnail from its own tokens,
InternVL's tiles from the object's tokens in any tile of the image; seeded per sample),
so it looks bigger while its inside is scrambled. Each predicted box is then scored against the
ground-truth box enlarged by `s` token widths on every side, clipped to the image. If the model
reads the extent from the tokens, padding `p` matches scale `s = p` best (the diagonal).

Token width: one token's size in original-image pixels (`scale * token_px` of the view; x and y
separately). LLaVA has one view. For InternVL, `scale_view="global"` (default) uses the
thumbnail's tokens — the view that drives localization (§1.6, Table 3) and whose ring is the
largest in pixels; "local" uses a tile's (all tiles of an image share one size). A lone-tile
image's only view is global.

Output columns: the localization columns of `evaluate`, with `gt_box`, `iou`, the hits and
`loc_score` against the *enlarged* box, then `padding` (0 = unmodified model), `seed` (NA for
padding 0), `gt_scale`, `views`, `n_extended` (ring tokens filled, every view), `token_width`,
`token_height`. One row per (sample, padding, seed, gt_scale). `extension_matrix` turns it into
Figure 1's p x s matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from hooked_vlm import interventions as iv
from hooked_vlm.boxes import Box, ImageSize, clip_box, iou
from hooked_vlm.experiments._conditions import (
    Condition, check_ints, check_views, conditions_work, per_sample_hooks, sample_rows,
)  # fmt: skip
from hooked_vlm.experiments.data import Sample, SampleMode
from hooked_vlm.inputs import ViewGeometry, VLMInput
from hooked_vlm.runs import Run, execute
from hooked_vlm.scoring import DEFAULT_THRESHOLDS, hit_column, is_hit, localization_score

CONDITION_COLUMNS = ["padding", "seed", "gt_scale", "views", "n_extended", "token_width", "token_height"]


def object_extension(
    model,
    dataset: Any,
    *,
    paddings: Sequence[int] = (0, 1, 2),
    gt_scales: Sequence[int] = (0, 1, 2),
    seeds: Sequence[int] = range(10),
    views: Literal["all", "global", "local"] = "all",
    scale_view: Literal["global", "local"] = "global",
    batch_size: int = 8,
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    frame=None,
    max_new_tokens: int | None = None,
    float_boxes: str = "official",
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Localization under object extension by each padding and seed, scored against each GT
    scale (see the module docstring). Padding 0 is the unmodified model, run once (the paper's
    reference row beside p = 1, 2). `views` extends only InternVL's thumbnail or tiles. `limit`,
    `sample`, `sample_seed`: which samples (`experiments.data.sample_sources`); `frame`,
    `max_new_tokens`, `float_boxes`: `evaluate`'s. `run`: a run directory to record the rows in and resume from (`hooked_vlm.runs`; one item per
    condition and sample, its answer scored against every GT scale when the table is made)."""
    check_views(model, views)
    paddings = check_ints(paddings, "paddings", minimum=0)
    gt_scales = check_ints(gt_scales, "gt_scales", minimum=0)
    seeds = check_ints(seeds, "seeds")
    if scale_view not in ("global", "local"):
        raise ValueError(f"unknown scale_view {scale_view!r}; expected 'global' or 'local'")
    if scale_view == "local" and model.cfg.family != "internvl":
        raise ValueError("scale_view='local' needs InternVL's tiles; a LLaVA model has one (global) view")
    conditions = []
    for padding in paddings:
        for seed in [None] if padding == 0 else seeds:
            name = "baseline" if padding == 0 else f"extend+{padding} s{seed}"
            labels = {"padding": padding, "seed": seed, "views": views}
            conditions.append(Condition(name, labels, _extending(padding, seed, views, scale_view)))
    work = conditions_work(
        "object_extension", model, dataset, "localization", conditions,
        columns=[c for c in CONDITION_COLUMNS if c != "gt_scale"], int_columns=("padding", "seed", "n_extended"),
        settings={"paddings": paddings, "gt_scales": gt_scales, "seeds": seeds, "views": views, "scale_view": scale_view},
        desc="object extension", batch_size=batch_size, limit=limit, sample=sample, sample_seed=sample_seed, frame=frame,
        max_new_tokens=max_new_tokens, float_boxes=float_boxes,
        finish=lambda results: _scored(results, gt_scales),
    )  # fmt: skip
    return execute(work, run, progress=progress)


def _scored(results: pd.DataFrame, gt_scales: list[int]) -> pd.DataFrame:
    """Every row scored against each GT scale, in (padding, seed, sample, scale) order."""
    table = pd.concat([score_against_enlarged(results, scale) for scale in gt_scales], ignore_index=True)
    table = table.sort_values(["padding", "seed", "sample_id", "gt_scale"], kind="stable", ignore_index=True)
    evaluate_columns = [c for c in results.columns if c not in CONDITION_COLUMNS]
    return table[evaluate_columns + CONDITION_COLUMNS]


def extension_matrix(results: pd.DataFrame, metric: str = "loc_score") -> pd.DataFrame:
    """Figure 1: rows `padding`, columns (`mean` | `sd`, `gt_scale`). The metric is averaged
    over samples per seed; mean and sample sd are then taken over seeds (sd 0 where there is one
    seed, e.g. padding 0, which runs once)."""
    per_seed = results.groupby(["padding", "seed", "gt_scale"], dropna=False)[metric].mean().reset_index()
    over_seeds = per_seed.groupby(["padding", "gt_scale"])[metric]
    stats = over_seeds.agg(mean="mean", sd=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    return stats.unstack("gt_scale")


def token_size(views: list[ViewGeometry], scale_view: str = "global") -> tuple[float, float]:
    """(width, height) in original pixels of one token of the first view of that kind; an
    image without a local view (a lone tile) falls back to its global view."""
    wanted = [v for v in views if v.is_global == (scale_view == "global")] or [v for v in views if v.is_global]
    view = wanted[0]
    return view.scale_x * view.token_px, view.scale_y * view.token_px


def enlarged_box(box: Box, image_size: ImageSize, token: tuple[float, float], scale: int) -> Box:
    """`box` grown by `scale` token widths (x) and heights (y) on every side, clipped to the image."""
    (x1, y1, x2, y2), (w, h) = box, token
    return clip_box((x1 - scale * w, y1 - scale * h, x2 + scale * w, y2 + scale * h), image_size)


def _extending(padding: int, seed: int | None, views: str, scale_view: str):
    def build(model, inputs: VLMInput, samples: list[Sample]):
        masks, rows = [s.mask for s in samples], sample_rows(inputs)
        inside = iv.object_tokens(inputs, masks, views=views, allow_empty=True)
        ring = iv.object_tokens(inputs, masks, dilation=padding, views=views, allow_empty=True) - inside

        def one(row: int, row_seed: int) -> list:
            if not inside.mask[row].any():  # no object token in these views (e.g. outside LLaVA's crop)
                return []
            regions = [mask if image_row == row else None for mask, image_row in zip(masks, rows)]
            return iv.object_extension(model, inputs, regions, padding, views=views, seed=row_seed)

        hooks = per_sample_hooks(inputs, samples, seed, one) if padding > 0 else []
        stats = []
        for image, row in enumerate(rows):
            width, height = token_size(inputs.layout.views[image], scale_view)
            stats.append({"n_extended": int(ring.mask[row].sum()), "token_width": width, "token_height": height})
        return hooks, stats

    return build


def score_against_enlarged(results: pd.DataFrame, scale: int) -> pd.DataFrame:
    """Re-score localization rows (`pred_box`, `gt_box`, `image_width`/`_height`, `token_width`/
    `_height`) against the GT box enlarged by `scale` tokens: new `gt_box`, `iou`, hits,
    `loc_score`, and a `gt_scale` column."""
    table = results.copy()
    rows = []
    for record in table.itertuples(index=False):
        if isinstance(getattr(record, "excluded", None), str):  # never asked: nothing to score
            rows.append({"gt_box": None, "iou": float("nan"), **{hit_column(t): None for t in DEFAULT_THRESHOLDS},
                         "loc_score": float("nan")})  # fmt: skip
            continue
        size = (record.image_width, record.image_height)
        gt = enlarged_box(record.gt_box, size, (record.token_width, record.token_height), scale)
        pred = record.pred_box if isinstance(record.pred_box, tuple) else None  # None (or NaN): unparsed
        value = float("nan") if pred is None else iou(pred, gt)
        hits = {hit_column(t): is_hit(value, t) for t in DEFAULT_THRESHOLDS}
        rows.append({"gt_box": gt, "iou": value, **hits, "loc_score": localization_score(pred, gt)})
    for column in rows[0]:
        table[column] = [row[column] for row in rows]
    table["gt_scale"] = scale
    return table
