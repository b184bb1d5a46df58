"""The page: an `AttentionView` encoded into one self-contained HTML document.

Storage (what a 7B model's page costs): attention weights are kept one byte each, per row (one
query, layer and head) relative to the row's maximum, which is stored as float32 beside it. The
byte codes the square root of that share: near the maximum a weight is off by at most 1/255 of
it, as a linear byte would be (the colour map has 256 entries: the heat-map shows the same),
while the many small weights of a row dominated by a few "sink" tokens keep their structure (a
thousandth of the maximum is byte 8, not 0), which the page's square-root colour scale reveals.
float16 would double the size for no visible gain. Only the image-token columns are kept.
Arrays are then zlib-compressed (the browser inflates them with `DecompressionStream`) and
base64-encoded; the original image is embedded as a data URI (PNG when small, else JPEG, at
most `MAX_IMAGE_SIDE` pixels on its long side: boxes stay in the original's pixel units).
"""

from __future__ import annotations

import base64
import html
import io
import json
import zlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from PIL import Image

from hooked_vlm.runs.files import write_file_atomically

if TYPE_CHECKING:
    from hooked_vlm.viewer.view import AttentionView

COLORMAP = "viridis"
MAX_IMAGE_SIDE = 1024
PNG_MAX_PIXELS = 256 * 256  # smaller images (the toys, thumbnails) are kept exactly, as PNG
FRAME_HEIGHT = 900  # px: the notebook iframe's height until the page's script fits it to its content


def render_page(view: AttentionView) -> str:
    page = _package_text("viewer.html").replace("/*STYLE*/", _package_text("viewer.css"))
    page = page.replace("/*SCRIPT*/", _package_text("viewer.js"))
    # user text goes in last, once each: the title with "_" escaped so it cannot hold "__DATA__";
    # the data is JSON inside a <script>, "<" escaped so that no token ("</img>", "</script>") ends it
    title = html.escape(view.title or "attention view").replace("_", "&#95;")
    data = json.dumps(page_data(view), separators=(",", ":")).replace("<", "\\u003c")
    return page.replace("__TITLE__", title, 1).replace("__DATA__", data, 1)


def page_data(view: AttentionView) -> dict:
    """Everything the page's script reads (see viewer.js), arrays encoded by `encode_array`."""
    lm_bytes, lm_scale = quantise_rows(view.lm_attention)
    vision_bytes, vision_scale = quantise_rows(view.vision_attention)
    vocab_ids = np.array(sorted(view.lens_vocab), dtype=np.int64)
    return {
        "title": view.title,
        "family": view.family,
        "image": {"src": image_data_uri(view.image), "width": view.image.size[0], "height": view.image.size[1]},
        "labels": view.labels,
        "answer_start": view.answer_start,
        "queries": view.queries.tolist(),
        "panel_px": view.panel_px,
        "start": view.start,
        **geometry(view),
        "colormap": encode_array(colormap_lut()),
        "lm": {
            "layers": view.layers,
            "n_heads": view.lm_attention.shape[1],
            "att": encode_array(lm_bytes),
            "scale": encode_array(lm_scale),
            "share": encode_array(view.lm_attention.sum(-1, dtype=np.float32)),  # exact, for the page's text
        },
        "vision": {
            "layers": view.vision_layers,
            "heads": "mean" if view.vision_heads == "mean" else view.vision_attention.shape[1],
            "cells": np.flatnonzero(view.layout.row.numpy() >= 0).tolist(),
            "cells_per_view": view.vision_attention.shape[-1],
            "att": encode_array(vision_bytes),
            "scale": encode_array(vision_scale),
            "share": encode_array(view.vision_attention.sum(-1, dtype=np.float32)),
        },
        "lens": {
            "layers": view.lens_layers,
            "k": view.lens_ids.shape[-1],
            "ids": encode_array(np.searchsorted(vocab_ids, view.lens_ids).astype(np.uint32)),
            "prob": encode_array(np.round(view.lens_probs * 255).astype(np.uint8)),
            "vocab": [view.lens_vocab[i] for i in vocab_ids.tolist()],
        },
    }


def geometry(view: AttentionView) -> dict:
    """The image tokens (sequence position, view, row, col, box in original pixels, not clipped:
    LLaVA's padding cells lie outside the image), the views, and the panels that draw them: a
    panel per token sheet (`ImageLayout.sheet_index`), so InternVL's tiles form one mosaic beside
    the thumbnail; tiles first, then global views. A panel spans the image and all its cells."""
    layout = view.layout
    views = layout.views[0]
    boxes = np.zeros((len(layout), 4))
    for t, (v, r, c) in enumerate(zip(layout.view.tolist(), layout.row.tolist(), layout.col.tolist())):
        if r >= 0:
            boxes[t] = views[v].token_boxes()[r, c]
    width, height = view.image.size
    extent = lambda chosen: [*np.minimum(boxes[chosen, :2].min(0), 0), *np.maximum(boxes[chosen, 2:].max(0), (width, height))]  # noqa: E731
    grid = layout.row.numpy() >= 0
    sheet = layout.sheet_index().numpy()
    panels = []
    for s in dict.fromkeys(sheet[grid].tolist()):
        members = sorted(set(layout.view.numpy()[grid & (sheet == s)].tolist()))
        name = f"tiles ({len(members)})" if len(members) > 1 else views[members[0]].name
        panels.append({"name": name, "views": members, "extent": extent(grid & (sheet == s)), "global": views[members[0]].is_global})
    panels.sort(key=lambda p: p["global"])
    view_list = []
    for v, g in enumerate(views):
        in_view = grid & (layout.view.numpy() == v)
        view_list.append({"name": g.name, "rows": g.rows, "cols": g.cols, "global": g.is_global,
                          "extent": [*boxes[in_view, :2].min(0), *boxes[in_view, 2:].max(0)]})  # fmt: skip
    tokens = {k: getattr(layout, k).tolist() for k in ("position", "view", "row", "col")}
    return {"tokens": {**tokens, "box": boxes.round(4).tolist()}, "views": view_list, "panels": panels}


def quantise_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One byte per value, coding the square root of its share of its row's maximum (last axis),
    and those maxima as float32: `value ~= (byte / 255) ** 2 * maximum`. An all-zero row is
    all zeros with maximum 0."""
    values = np.asarray(values, dtype=np.float32)
    scale = values.max(-1)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.round(np.sqrt(np.clip(values / safe, 0.0, 1.0)) * 255).astype(np.uint8), scale.astype(np.float32)


def encode_array(array: np.ndarray) -> dict:
    """{"dtype", "shape", "data"}: little-endian bytes, zlib-compressed, base64-encoded."""
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    data = base64.b64encode(zlib.compress(array.tobytes(), 6)).decode("ascii")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}


def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """The colour map as 256 sRGB triples (uint8), flattened: what the page paints with."""
    return np.round(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8).ravel()


def image_data_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    if max(image.size) > MAX_IMAGE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    small = image.size[0] * image.size[1] <= PNG_MAX_PIXELS
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if small else "JPEG", **({} if small else {"quality": 90}))
    return f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def notebook_frame(page: str) -> str:
    """The page in an iframe (`srcdoc`): its script and styles cannot clash with the notebook's
    or another view's; the page grows the frame to its content."""
    return (
        f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width: 100%; height: {FRAME_HEIGHT}px; border: 0" '
        'title="attention over the image"></iframe>'
    )


def write_page(path: Path, content: str | bytes) -> Path:
    """Write a page (or its screenshot) atomically: the previous file or none after a failure."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    return write_file_atomically(path, lambda f: f.write(data))


def _package_text(name: str) -> str:
    return resources.files("hooked_vlm.viewer").joinpath(name).read_text(encoding="utf-8")
