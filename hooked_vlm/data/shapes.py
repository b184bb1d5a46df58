"""Exact rasterisation of the flat shapes used by the synthetic localization dataset.

Every shape is drawn from a coverage map (the fraction of a pixel the shape covers, estimated
with a fixed grid of sub-pixel samples). The object's mask is ``coverage >= 0.5`` whether or not
the picture is antialiased, so turning antialiasing on or off changes the pixels but never the
mask, the box or the token sets derived from them.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Bool, Float

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "star", "diamond", "hexagon", "ring",
)

# Sub-pixel samples per axis used to estimate coverage (16 samples per pixel).
_SUPERSAMPLE = 4
# Inner radius of a ring, as a fraction of its outer radius.
_RING_INNER = 0.55
# Half-width of a cross's arms, as a fraction of its half-size.
_CROSS_HALF_WIDTH = 0.34


def _normalised(vertices: list[tuple[float, float]]) -> np.ndarray:
    """Centre a polygon on its bounding box and scale its longer side to span [-1, 1]."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    return (v - (lo + hi) / 2) * (2 / (hi - lo).max())


def _regular(n_points: int, start_deg: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Vertices of a regular polygon or star (alternating ``radii``), y pointing down."""
    n = n_points * len(radii)
    angles = [math.radians(start_deg + 360 * k / n) for k in range(n)]
    return _normalised([(radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a))
                        for k, a in enumerate(angles)])


def _cross() -> np.ndarray:
    """A plus sign: twelve vertices, arms of half-width ``_CROSS_HALF_WIDTH``."""
    w = _CROSS_HALF_WIDTH
    return _normalised([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                        (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])


# Polygons in unit coordinates (x right, y down, bounding box's longer side spanning [-1, 1]).
_POLYGONS: dict[str, np.ndarray] = {
    "square": _normalised([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "diamond": _normalised([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "triangle": _normalised([(0, -1), (1, 1), (-1, 1)]),
    "cross": _cross(),
    "star": _regular(5, -90, radii=(1.0, 0.45)),
    "hexagon": _regular(6, 0),
}


def _inside_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over sample points (works for stars)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at_y)
    return inside


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether unit-coordinate points lie inside ``shape``."""
    if shape == "circle":
        return x**2 + y**2 <= 1
    if shape == "ring":
        r2 = x**2 + y**2
        return (r2 <= 1) & (r2 >= _RING_INNER**2)
    if shape in _POLYGONS:
        return _inside_polygon(x, y, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def coverage(shape: str, centre: tuple[float, float], size: float,
             image_size: tuple[int, int]) -> Float[np.ndarray, "height width"]:
    """Fraction of each pixel covered by ``shape``, in [0, 1]; ``image_size`` is (width, height).

    ``centre`` is (x, y) in pixel coordinates where pixel (i, j) spans [j, j+1) × [i, i+1);
    ``size`` is the side of the shape's bounding square in pixels. Only a window around the
    shape is sampled, so the cost scales with the object, not the image.
    """
    width, height = image_size
    cx, cy = centre
    half = size / 2
    x0, x1 = max(int(math.floor(cx - half)) - 1, 0), min(int(math.ceil(cx + half)) + 1, width)
    y0, y1 = max(int(math.floor(cy - half)) - 1, 0), min(int(math.ceil(cy + half)) + 1, height)
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).ravel()
    grid_x, grid_y = np.meshgrid((xs - cx) / half, (ys - cy) / half)
    hits = _inside(shape, grid_x, grid_y).astype(np.float32)
    window = hits.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    out = np.zeros((height, width), dtype=np.float32)
    out[y0:y1, x0:x1] = window
    return out


def dilate_mask(mask: Bool[np.ndarray, "height width"],
                radius: int = 1) -> Bool[np.ndarray, "height width"]:
    """Binary dilation by a (2r+1)² square: every pixel within Chebyshev distance ``radius``."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def mask_box(mask: Bool[np.ndarray, "height width"]) -> tuple[float, float, float, float]:
    """Tight box ``(x1, y1, x2, y2)`` of a non-empty mask, in pixel-edge coordinates.

    Pixel (i, j) spans [j, j+1) × [i, i+1), so x2 = last column + 1. This equals the COCO box
    ``[x, y, w, h]`` that pycocotools computes from the same mask, as (x, y, x + w, y + h).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
