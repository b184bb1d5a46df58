"""Image tokens over the image: each token drawn at the pixel box it covers in the original image."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PatchCollection
from matplotlib.colors import Colormap, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from hooked_vlm.inputs import Box, ImageLayout, Views

from hooked_vlm.plotting.charts import ArrayLike


# ----------------------------------------------------------------------------- image tokens
def token_overlay(
    image: Image.Image,
    layout: ImageLayout,
    image_index: int = 0,
    *,
    positions: Tensor | Iterable[int] | None = None,
    values: Float[ArrayLike, "n_image_tokens"] | None = None,
    views: Views = "all",
    alpha: float = 0.5,
    cmap: str | Colormap = "viridis",
    box: Box | Mapping[str, Box] | None = None,
    title: str | None = None,
    highlight_color: str = "red",
) -> Figure:
    """The original image once per selected view, with that view's tokens drawn at the pixel
    boxes they cover in it (`layout.box`).

    `values` (one per token of the image, in layout order, e.g. `attention_to_image(...)`)
    colours each token's cell (NaN: not drawn); `positions` (sequence positions, e.g. ablated
    or knocked-out tokens) are filled, or only outlined when `values` are drawn too. Tokens that
    see only padding (zero-area box) and CLS tokens are skipped. `views`: "all", "global",
    "local", a view index or name, or a list of indices; panels show local tiles first, then
    global views, titled with the view name. `box` draws a pixel box (a dict: labelled boxes,
    e.g. {"GT": ..., "predicted": ...})."""
    if not 0 <= image_index < layout.n_images:
        raise IndexError(f"image index {image_index} out of range for a layout of {layout.n_images} images")
    width, height = layout.image_sizes[image_index]
    if image.size != (width, height):
        raise ValueError(
            f"the image is {image.size[0]}x{image.size[1]} but the layout's image {image_index} is {width}x{height}"
        )
    tokens = (layout.image == image_index).cpu().numpy()
    boxes, view_of = layout.box.cpu().numpy()[tokens], layout.view.cpu().numpy()[tokens]
    drawn = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # padding-only and CLS tokens have no area
    token_values = None if values is None else _token_values(values, len(boxes))
    highlighted = _highlight_mask(positions, layout.position.cpu().numpy()[tokens], image_index)
    panels = _selected_views(layout, image_index, views)
    norm = None if token_values is None else _overlay_norm(token_values[drawn & np.isin(view_of, panels)])
    fig, axes = _panel_grid(len(panels), aspect=height / width)
    pixels = np.asarray(image.convert("RGB"))
    for ax, v in zip(axes, panels):
        ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
        in_view = drawn & (view_of == v)
        if token_values is not None:
            shown = in_view & np.isfinite(token_values)
            cells = PatchCollection(_rectangles(boxes[shown]), cmap=cmap, norm=norm, alpha=alpha, edgecolor="none")
            cells.set_array(token_values[shown])
            cells.set_gid("token-values")
            ax.add_collection(cells)
        if highlighted is not None:
            fill = "none" if token_values is not None else to_rgba(highlight_color, alpha)
            outlined = _rectangles(boxes[in_view & highlighted])
            cells = PatchCollection(outlined, facecolor=fill, edgecolor=highlight_color, linewidth=0.6)
            cells.set_gid("token-highlight")
            ax.add_collection(cells)
        if not layout.views[image_index][v].is_global and in_view.any():
            _draw_view_extent(ax, boxes[in_view])
        _draw_pixel_boxes(ax, box)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        ax.set_title(layout.views[image_index][v].name, fontsize=9)
    if token_values is not None:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def attention_to_image(
    cache: Mapping[str, Tensor],
    layout: ImageLayout,
    layer: int,
    head: int,
    query_position: int,
    image_index: int = 0,
    batch_index: int | None = None,
) -> Float[Tensor, "n_image_tokens"]:
    """How much one language-model head attends from `query_position` to each of the image's
    tokens (all views, layout order): the `values` that `token_overlay` expects.

    Reads `blocks.{layer}.attn.hook_pattern` `[batch, head, query, key]` from a
    `run_with_cache` cache. `query_position` indexes the query axis (negative counts from the
    end, so -1 is the last token). `batch_index` defaults to the image's batch row; pass it to
    read another row holding the same prompt (e.g. a batch of source and base runs)."""
    is_pattern = re.compile(r"blocks\.(\d+)\.attn\.hook_pattern")
    cached = sorted(int(m.group(1)) for m in map(is_pattern.fullmatch, cache.keys()) if m)
    if layer not in cached:
        held = f"layers {cached[0]}..{cached[-1]}" if cached else "no layer (was hook_pattern filtered out?)"
        raise IndexError(f"layer {layer} out of range: the cache holds attention patterns of {held}")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    pattern = pattern[None] if pattern.ndim == 3 else pattern  # a cache made with remove_batch_dim
    n_batch, n_heads, n_query, n_key = pattern.shape
    if not 0 <= image_index < layout.n_images:
        raise IndexError(f"image index {image_index} out of range for a layout of {layout.n_images} images")
    row = layout.image_batch_row[image_index] if batch_index is None else batch_index
    if not 0 <= row < n_batch:
        raise IndexError(f"batch index {row} out of range: the cache holds {n_batch} rows")
    if not 0 <= head < n_heads:
        raise IndexError(f"head {head} out of range: layer {layer} has {n_heads} heads")
    if not -n_query <= query_position < n_query:
        raise IndexError(f"query position {query_position} out of range: the pattern has {n_query} query positions")
    keys = layout.positions(image_index)
    if len(keys) and int(keys.max()) >= n_key:
        raise ValueError(f"the layout's image tokens reach position {int(keys.max())} but the pattern has {n_key} keys")
    return pattern[row, head, query_position, keys.to(pattern.device)].detach().float().cpu()


def _selected_views(layout: ImageLayout, image: int, views: Views) -> list[int]:
    """View indices to draw: local views first, then global ones (InternVL: tiles, thumbnail)."""
    geometry = layout.views[image]
    names = [g.name for g in geometry]
    if isinstance(views, str) and views in ("all", "global", "local"):
        wanted = [i for i, g in enumerate(geometry) if views == "all" or g.is_global == (views == "global")]
        if not wanted:
            raise ValueError(f"image {image} has no {views} view (views: {names})")
    elif isinstance(views, str) and views in names:
        wanted = [names.index(views)]
    elif isinstance(views, (int, np.integer)) and not isinstance(views, bool):
        wanted = [int(views)]
    elif isinstance(views, Sequence) and not isinstance(views, str) and views:
        wanted = list(views)
    else:
        raise ValueError(f"unknown view {views!r}: use 'all', 'global', 'local', a view name {names} or indices")
    for v in wanted:
        if not isinstance(v, (int, np.integer)) or not 0 <= v < len(geometry):
            raise ValueError(f"unknown view {v!r}: image {image} has views 0..{len(geometry) - 1} {names}")
    return sorted(dict.fromkeys(int(v) for v in wanted), key=lambda v: geometry[v].is_global)


def _token_values(values: ArrayLike, n_tokens: int) -> np.ndarray:
    out = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if out.shape != (n_tokens,):
        raise ValueError(f"values must hold one number per image token ({n_tokens}), got shape {out.shape}")
    return out.astype(float)


def _highlight_mask(
    positions: Tensor | Iterable[int] | None, image_positions: np.ndarray, image: int
) -> np.ndarray | None:
    """Which of the image's tokens are at `positions`; a position that is not one of them is an
    error (most likely positions from another image or prompt)."""
    if positions is None:
        return None
    wanted = np.asarray(positions.cpu() if isinstance(positions, Tensor) else list(positions), dtype=np.int64).ravel()
    stray = np.setdiff1d(wanted, image_positions)
    if len(stray):
        raise ValueError(f"positions {stray[:8].tolist()} are not image tokens of image {image}")
    return np.isin(image_positions, wanted)


def _rectangles(boxes: Float[np.ndarray, "n 4"]) -> list[Rectangle]:
    return [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes]


def _draw_view_extent(ax: Axes, boxes: Float[np.ndarray, "n 4"]) -> None:
    """Outline the part of the image a local view (a tile) covers, so each panel shows which tile it is."""
    x1, y1 = boxes[:, :2].min(0)
    x2, y2 = boxes[:, 2:].max(0)
    outline = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linestyle="--", linewidth=1.2)
    outline.set_gid("view-extent")
    ax.add_patch(outline)


def _draw_pixel_boxes(ax: Axes, box: Box | Mapping[str, Box] | None) -> None:
    if box is None:
        return
    labelled = box if isinstance(box, Mapping) else {None: box}
    colours = ["lime", "magenta", "cyan", "yellow", "orange"]
    for i, (label, (x1, y1, x2, y2)) in enumerate(labelled.items()):
        colour = colours[i % len(colours)]
        drawn = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, label=label)
        drawn.set_gid("pixel-box")
        ax.add_patch(drawn)
    if isinstance(box, Mapping):
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)


def _overlay_norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return Normalize(0.0, 1.0)
    return Normalize(float(finite.min()), float(finite.max()))


def _panel_grid(n: int, aspect: float, max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    """A figure with `n` image panels, `max_cols` to a row; unused grid cells removed."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    panel = 3.2
    fig = Figure(figsize=(panel * cols + 0.8, min(panel * aspect, 2 * panel) * rows + 0.6), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for extra in axes[n:]:
        extra.remove()
    return fig, axes[:n]


