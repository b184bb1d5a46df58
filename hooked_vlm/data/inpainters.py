"""Inpainters for object removal (`hooked_vlm.data.removal`): callables that fill a masked region.

- `OpenCVInpainter`: OpenCV's classical inpainting (Telea 2004 or Navier-Stokes), fast and
  offline; what the tests use. It smears the surroundings inwards, so on photos a large object
  leaves a visible blur: fine for a pipeline check, not for the paper's numbers.
- `LamaInpainter`: LaMa (Suvorov et al., WACV 2022), the paper's inpainter. It runs the
  TorchScript export `big-lama.pt` that the LaMa tools (lama-cleaner, IOPaint, simple-lama-
  inpainting) distribute, with torch alone: those packages pin Pillow < 10 (and IOPaint an old
  huggingface_hub), so none installs beside this library. The weights are a file you give
  (`weights=`, `--lama-weights`, or the `LAMA_MODEL` variable those tools also read), else the
  copy in torch's hub cache, else downloaded there once (md5-checked). Without a connection the
  error says where to put the file.

A custom inpainter is any callable `(image uint8 [H, W, 3], mask bool [H, W]) -> uint8 [H, W, 3]`
with a `settings()` dict (recorded in the output folder, so a rerun cannot mix two inpainters).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Bool, UInt8

LAMA_URL = "https://github.com/Sanster/models/releases/download/add_big_lama/big-lama.pt"
LAMA_MD5 = "e3aa4aaa15225a33ec84f9f4bc47e500"
LAMA_FILE = "big-lama.pt"
LAMA_PAD = 8  # the network downsamples three times: sides must be multiples of 8


class Inpainter(Protocol):
    def __call__(
        self, image: UInt8[np.ndarray, "height width 3"], mask: Bool[np.ndarray, "height width"]
    ) -> UInt8[np.ndarray, "height width 3"]: ...

    def settings(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class OpenCVInpainter:
    """`cv2.inpaint` with `method` "telea" or "ns" and a neighbourhood of `radius` pixels."""

    method: str = "telea"
    radius: int = 5

    def __post_init__(self) -> None:
        if self.method not in ("telea", "ns"):
            raise ValueError(f"OpenCV inpainting method must be 'telea' or 'ns', got {self.method!r}")
        if self.radius < 1:
            raise ValueError(f"radius must be >= 1 pixel, got {self.radius}")

    def settings(self) -> dict[str, Any]:
        return {"name": "opencv", "method": self.method, "radius": self.radius}

    def __call__(self, image, mask):
        cv2 = _import_cv2()
        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        # channel order does not matter: each channel is filled on its own
        return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8) * 255, self.radius, flag)


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError("OpenCV inpainting needs OpenCV: pip install opencv-python-headless") from error
    return cv2


class LamaInpainter:
    """LaMa from a TorchScript `big-lama.pt` (see the module docstring for where it comes from).
    `device`: default CUDA when available. The image is run at its own resolution, padded
    symmetrically to a multiple of 8 as LaMa's own prediction code does, and cropped back."""

    def __init__(self, weights: str | Path | None = None, *, device: str | torch.device | None = None, download: bool = True):
        self.weights = resolve_lama_weights(weights, download=download)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.model = torch.jit.load(str(self.weights), map_location=self.device).eval()
        except RuntimeError as error:
            raise ValueError(
                f"{self.weights} is not a TorchScript model ({error.__class__.__name__}); LamaInpainter runs the "
                f"TorchScript export {LAMA_FILE} of the LaMa tools, not LaMa's training checkpoint. {_how_to_get()}"
            ) from error
        self._md5 = _md5(self.weights)

    def settings(self) -> dict[str, Any]:
        return {"name": "lama", "weights_md5": self._md5}

    @torch.no_grad()
    def __call__(self, image, mask):
        height, width = mask.shape
        pad = ((0, -height % LAMA_PAD), (0, -width % LAMA_PAD))
        pixels = np.pad(image, (*pad, (0, 0)), mode="symmetric").astype(np.float32) / 255
        region = np.pad(mask, pad, mode="symmetric").astype(np.float32)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(self.device)
        m = torch.from_numpy(region)[None, None].to(self.device)
        out = self.model(x, m)[0, :, :height, :width].permute(1, 2, 0).float().cpu().numpy()
        return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def lama_cache_path() -> Path:
    """Where the downloaded weights are kept: torch's hub cache, as the LaMa tools keep them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LAMA_FILE


def resolve_lama_weights(weights: str | Path | None = None, *, download: bool = True) -> Path:
    """The LaMa weights file: `weights`, else `$LAMA_MODEL`, else the hub cache's copy, else
    downloaded into the cache (with `download`). Missing or failing: an error that says how to
    get the file."""
    given = weights if weights is not None else os.environ.get("LAMA_MODEL")
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LaMa weights not found: {path}. {_how_to_get()}")
        return path
    cached = lama_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"no LaMa weights given and none in {cached} (downloading is off). {_how_to_get()}")
    return _download(cached)


def _download(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        torch.hub.download_url_to_file(LAMA_URL, str(partial), progress=True)
        if _md5(partial) != LAMA_MD5:
            raise ValueError(f"the downloaded file's md5 is {_md5(partial)}, expected {LAMA_MD5}")
        os.replace(partial, path)
    except Exception as error:  # no connection, a proxy page, a truncated file ...
        raise RuntimeError(f"could not download the LaMa weights ({error}). {_how_to_get()}") from error
    finally:
        partial.unlink(missing_ok=True)
    return path


def _how_to_get() -> str:
    return (
        f"Get {LAMA_FILE} where there is a connection (`curl -L -o {LAMA_FILE} {LAMA_URL}`, md5 {LAMA_MD5}) and "
        f"pass it: `hooked-vlm remove-objects ... --inpainter lama --lama-weights {LAMA_FILE}`, "
        f"LamaInpainter(weights='{LAMA_FILE}') or LAMA_MODEL={LAMA_FILE}; or copy it to {lama_cache_path()}"
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
