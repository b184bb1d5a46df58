"""Model inputs and the image-token map.

`VLMInput` carries what one forward needs (token ids, masks, positions, pixels) and an
`ImageLayout`: for every image token of every batch item, its sequence position, image, view,
(row, col) in that view and the pixel box it covers in the *original* image — through resize,
pad-to-square or centre crop, and tiling. The layout also answers the reverse question: which
token positions does a pixel box or mask cover, with dilation by +-k tokens. Experiments address
tokens only through it; nothing hard-codes 576.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in original-image pixels
Views = Union[str, int, Sequence[int]]  # "all" | "global" | "local" | view index | indices


@dataclass(frozen=True)
class ViewGeometry:
    """One view of an image: a `rows x cols` grid of tokens, each `token_px` view pixels wide,
    over a region of the original image.

    View pixel (u, v) is original pixel (`scale_x * u + offset_x`, `scale_y * v + offset_y`).
    `is_global` marks views that see the whole image (LLaVA's single grid, InternVL's thumbnail);
    InternVL's tiles are local views.
    """

    name: str
    rows: int
    cols: int
    token_px: float
    scale_x: float
    offset_x: float
    scale_y: float
    offset_y: float
    is_global: bool
    has_cls: bool = False  # a CLS token precedes the grid (LLaVA's "full" strategy)

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols + self.has_cls

    def token_boxes(self) -> Float[np.ndarray, "rows cols 4"]:
        """Every grid token's box in original-image pixels (not clipped to the image)."""
        c = np.arange(self.cols, dtype=np.float64)
        r = np.arange(self.rows, dtype=np.float64)
        x1 = self.scale_x * c * self.token_px + self.offset_x
        x2 = self.scale_x * (c + 1) * self.token_px + self.offset_x
        y1 = self.scale_y * r * self.token_px + self.offset_y
        y2 = self.scale_y * (r + 1) * self.token_px + self.offset_y
        boxes = np.zeros((self.rows, self.cols, 4))
        boxes[..., 0], boxes[..., 2] = x1[None, :], x2[None, :]
        boxes[..., 1], boxes[..., 3] = y1[:, None], y2[:, None]
        return boxes


@dataclass
class ImageLayout:
    """The image-token map of a batch. One row per image token, in sequence order.

    Columns (tensors of length n_image_tokens): `batch` (batch row), `position` (sequence
    position in that row), `image` (image index in the batch), `view` (index into
    `views[image]`), `row`, `col` (-1 for a CLS token), `box` `[n, 4]` (the token's pixel box in
    the original image, clipped to it; zero area for a token that sees only padding).
    """

    image_sizes: list[tuple[int, int]]  # (width, height) of each original image
    views: list[list[ViewGeometry]]  # per image, in the order their tokens appear
    image_batch_row: list[int]  # batch row of each image
    batch: Int[Tensor, "n"]
    position: Int[Tensor, "n"]
    image: Int[Tensor, "n"]
    view: Int[Tensor, "n"]
    row: Int[Tensor, "n"]
    col: Int[Tensor, "n"]
    box: Float[Tensor, "n 4"]

    @classmethod
    def build(
        cls,
        image_sizes: list[tuple[int, int]],
        views: list[list[ViewGeometry]],
        image_positions: list[Int[Tensor, "k"]],
        image_batch_row: list[int],
    ) -> ImageLayout:
        """Assemble the table from each image's views and the sequence positions of its tokens."""
        columns: dict[str, list] = {k: [] for k in ("batch", "position", "image", "view", "row", "col", "box")}
        for i, (size, image_views, positions) in enumerate(zip(image_sizes, views, image_positions)):
            expected = sum(v.n_tokens for v in image_views)
            if len(positions) != expected:
                raise ValueError(
                    f"image {i}: the prompt has {len(positions)} image tokens but its views need {expected}"
                )
            for v, geometry in enumerate(image_views):
                rows, cols = np.divmod(np.arange(geometry.rows * geometry.cols), geometry.cols)
                boxes = _clip_boxes(geometry.token_boxes().reshape(-1, 4), size)
                if geometry.has_cls:
                    rows, cols = np.concatenate([[-1], rows]), np.concatenate([[-1], cols])
                    boxes = np.concatenate([np.zeros((1, 4)), boxes])
                columns["row"].append(rows)
                columns["col"].append(cols)
                columns["box"].append(boxes)
                columns["view"].append(np.full(len(rows), v))
                columns["image"].append(np.full(len(rows), i))
                columns["batch"].append(np.full(len(rows), image_batch_row[i]))
            columns["position"].append(np.asarray(positions))
        tensors = {
            k: torch.as_tensor(np.concatenate(v) if v else np.zeros((0, 4) if k == "box" else 0))
            for k, v in columns.items()
        }
        tensors = {k: (t.float() if k == "box" else t.long()) for k, t in tensors.items()}
        return cls(image_sizes=image_sizes, views=views, image_batch_row=image_batch_row, **tensors)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def n_images(self) -> int:
        return len(self.image_sizes)

    def view_names(self, image: int = 0) -> list[str]:
        return [v.name for v in self.views[image]]

    def positions(self, image: int = 0, views: Views = "all") -> Int[Tensor, "k"]:
        """Sequence positions (in the image's batch row) of the image's tokens in the chosen views."""
        return self.position[self._token_filter(image, views)]

    def grid(self, image: int = 0, view: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of one view laid out as its token grid."""
        geometry = self.views[image][view]
        selected = self._token_filter(image, view) & (self.row >= 0)
        return self.position[selected].view(geometry.rows, geometry.cols)

    def box_to_positions(self, box: Box, image: int = 0, dilation: int = 0, views: Views = "all") -> Int[Tensor, "k"]:
        """Positions of the tokens whose pixel box overlaps `box` (positive area), grown
        (`dilation > 0`) or shrunk (`dilation < 0`) by that many token rings in the image (§1.4).

        Growth works on the image's token sheets (see `_sheets`): tiles that partition the image
        (InternVL's local views) are joined into one grid, so a ring crosses the seams between
        them; any other view (LLaVA's grid, InternVL's thumbnail) is a sheet of its own. Tokens
        that cover no pixel of the image (LLaVA's "pad" mode padding) are outside it, as cells
        beyond a sheet's edge are: dilation never adds them, and erosion, like the sheet's edge,
        does not eat the object from them. `views` then picks which of the grown tokens to
        return; the growth itself sees every view."""
        width, height = self.image_sizes[image]
        if len(box) != 4:
            raise ValueError(f"box {box} must be (x1, y1, x2, y2) in pixels of the original image")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f"box {box} is empty or outside image {image} of size {width}x{height}")
        b = self.box
        covered = (torch.minimum(b[:, 2], torch.tensor(x2)) - torch.maximum(b[:, 0], torch.tensor(x1)) > 0) & (
            torch.minimum(b[:, 3], torch.tensor(y2)) - torch.maximum(b[:, 1], torch.tensor(y1)) > 0
        )
        return self._dilated_positions(covered, image, dilation, views)

    def mask_to_positions(
        self, mask: Bool[np.ndarray, "height width"] | Tensor, image: int = 0, dilation: int = 0, views: Views = "all"
    ) -> Int[Tensor, "k"]:
        """Positions of the tokens whose pixel box contains at least one pixel of `mask`
        (H x W, the original image's size), then dilated or eroded as in `box_to_positions`."""
        mask = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
        width, height = self.image_sizes[image]
        if mask.shape != (height, width):
            raise ValueError(f"mask has shape {mask.shape} but image {image} is {height}x{width} (H x W)")
        if not mask.any():
            raise ValueError("mask is empty: it selects no pixel")
        # Summed-area table: pixels inside each token's box (pixel (x, y) spans [x, x+1) x [y, y+1))
        sat = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        in_image = (self.image == image).numpy()  # other images' boxes are in their own pixels
        boxes = self.box.numpy()[in_image]
        x1, y1 = np.floor(boxes[:, 0]).astype(int), np.floor(boxes[:, 1]).astype(int)
        x2, y2 = np.ceil(boxes[:, 2]).astype(int), np.ceil(boxes[:, 3]).astype(int)
        covered = np.zeros(len(self), dtype=bool)
        covered[in_image] = sat[y2, x2] - sat[y1, x2] - sat[y2, x1] + sat[y1, x1] > 0
        return self._dilated_positions(torch.as_tensor(covered), image, dilation, views)

    def token_grid_mask(self, positions: Tensor, image: int = 0, view: int = 0) -> Bool[Tensor, "rows cols"]:
        """Which cells of a view's grid are among `positions` (e.g. for plotting)."""
        return torch.isin(self.grid(image, view), positions.to(self.position.device))

    def select_images(self, images: Sequence[int]) -> ImageLayout:
        """The layout of a sub-batch holding these images, in this order, each with its batch row:
        rows are renumbered in the order they first appear (build the sub-batch from them so)."""
        rows = [self.image_batch_row[i] for i in images]
        new_row = {r: k for k, r in enumerate(dict.fromkeys(rows))}
        keep = torch.isin(self.image, torch.tensor(list(images)))
        image_map = torch.full((self.n_images,), -1, dtype=torch.long)
        image_map[torch.tensor(list(images))] = torch.arange(len(images))
        return replace(
            self,
            image_sizes=[self.image_sizes[i] for i in images],
            views=[self.views[i] for i in images],
            image_batch_row=[new_row[r] for r in rows],
            batch=torch.tensor([new_row[int(r)] for r in self.batch[keep]], dtype=torch.long),
            position=self.position[keep],
            image=image_map[self.image[keep]],
            view=self.view[keep],
            row=self.row[keep],
            col=self.col[keep],
            box=self.box[keep],
        )

    def view_index(self) -> Int[Tensor, "n"]:
        """Each token's view as an index into `pixel_values` (every view of every image, in order):
        the batch index the vision tower sees it under."""
        offsets = torch.tensor([0] + [len(v) for v in self.views], dtype=torch.long).cumsum(0)[:-1]
        return offsets[self.image] + self.view

    def sheet_index(self) -> Int[Tensor, "n"]:
        """Each token's sheet, the token grid that dilation grows on (`box_to_positions`): the
        local tiles of one image (InternVL) form one sheet, every other view is a sheet of its
        own. A sheet is numbered by the `view_index` of its first view."""
        first_view = self.view.clone()
        for image, image_views in enumerate(self.views):
            for members, _ in _sheets(image_views):
                for view, _, _ in members:
                    first_view[(self.image == image) & (self.view == view)] = members[0][0]
        return self.view_index() - self.view + first_view

    def vision_positions(self, merge: int = 1) -> Int[Tensor, "n merged"]:
        """The vision-tower sequence positions each image token is computed from, in its view:
        a `merge x merge` block of patches (`merged = merge**2`; InternVL's pixel shuffle merges
        2x2, LLaVA 1x1). Patch (r, c) of a grid `n` patches wide sits at `1 + r * n + c`, position 0
        being the tower's CLS token, which is also where a CLS image token comes from."""
        out = torch.zeros(len(self), merge * merge, dtype=torch.long)
        d_row, d_col = torch.arange(merge * merge).div(merge, rounding_mode="floor"), torch.arange(merge * merge) % merge
        cols_of_view = torch.tensor([g.cols for image_views in self.views for g in image_views], dtype=torch.long)
        width = cols_of_view[self.view_index()] * merge
        patch = self.row >= 0
        rows = self.row[patch, None] * merge + d_row
        cols = self.col[patch, None] * merge + d_col
        out[patch] = 1 + rows * width[patch, None] + cols
        return out

    def same_geometry(self, other: ImageLayout) -> bool:
        """Whether two layouts put the same views at the same positions (needed for patching)."""
        return (
            self.views == other.views
            and self.image_batch_row == other.image_batch_row
            and torch.equal(self.position, other.position)
            and torch.equal(self.batch, other.batch)
        )

    def _token_filter(self, image: int, views: Views) -> Bool[Tensor, "n"]:
        if not 0 <= image < self.n_images:
            raise IndexError(f"image index {image} out of range for a batch of {self.n_images} images")
        selected = self.image == image
        image_views = self.views[image]
        if isinstance(views, str) and views == "all":
            return selected
        if isinstance(views, str):
            if views not in ("global", "local"):
                raise ValueError(f"unknown views {views!r}: use 'all', 'global', 'local', a view index or a list of them")
            wanted = [i for i, v in enumerate(image_views) if v.is_global == (views == "global")]
        else:
            wanted = [int(views)] if isinstance(views, numbers.Integral) else [int(v) for v in views]  # numpy ints too
            for v in wanted:
                if not 0 <= v < len(image_views):
                    raise IndexError(f"view {v} out of range: image {image} has {len(image_views)} views")
        return selected & torch.isin(self.view, torch.tensor(wanted, dtype=torch.long))

    def _dilated_positions(self, covered: Bool[Tensor, "n"], image: int, dilation: int, views: Views) -> Int[Tensor, "k"]:
        keep = self._token_filter(image, views) & (self.row >= 0)
        if dilation == 0:
            return self.position[keep & covered]
        on_image = (self.box[:, 2] > self.box[:, 0]) & (self.box[:, 3] > self.box[:, 1])
        grown = torch.zeros_like(covered)
        for members, shape in _sheets(self.views[image]):
            tokens, rows, cols = [], [], []
            for view, row0, col0 in members:
                in_view = ((self.image == image) & (self.view == view) & (self.row >= 0)).nonzero().flatten()
                tokens.append(in_view)
                rows.append(self.row[in_view] + row0)
                cols.append(self.col[in_view] + col0)
            tokens, rows, cols = torch.cat(tokens), torch.cat(rows), torch.cat(cols)
            grid, off_image = torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
            grid[rows, cols], off_image[rows, cols] = covered[tokens], ~on_image[tokens]
            grown[tokens] = _grow(grid, off_image, dilation)[rows, cols]
        return self.position[keep & grown]


Sheet = tuple[list[tuple[int, int, int]], tuple[int, int]]  # [(view, row offset, col offset)], (rows, cols)


def _sheets(views: list[ViewGeometry]) -> list[Sheet]:
    """The token grids of one image that dilation works on. The local views form one sheet when
    they tile a rectangle of one token lattice (InternVL's tiles partition the resized image);
    otherwise, and for every global view, a view is a sheet of its own."""
    local = [v for v, g in enumerate(views) if not g.is_global]
    joined = _join(views, local) if local else None
    alone = [v for v, g in enumerate(views) if g.is_global or joined is None]
    return [([(v, 0, 0)], (views[v].rows, views[v].cols)) for v in alone] + ([joined] if joined else [])


def _join(views: list[ViewGeometry], members: list[int]) -> Sheet | None:
    """One sheet of these views if their tokens are cells of one lattice (equal token size in
    original pixels, corners on the lattice) that fill a rectangle exactly once, else None."""
    first = views[members[0]]
    token_w, token_h = first.scale_x * first.token_px, first.scale_y * first.token_px
    corners = []
    for v in members:
        g = views[v]
        row0, col0 = g.offset_y / token_h, g.offset_x / token_w
        same_size = np.isclose(g.scale_x * g.token_px, token_w) and np.isclose(g.scale_y * g.token_px, token_h)
        if not (same_size and np.isclose(row0, round(row0)) and np.isclose(col0, round(col0))):
            return None
        corners.append((round(row0), round(col0)))
    top, left = min(r for r, _ in corners), min(c for _, c in corners)
    placed = [(v, r - top, c - left) for v, (r, c) in zip(members, corners)]
    rows = max(r + views[v].rows for v, r, _ in placed)
    cols = max(c + views[v].cols for v, _, c in placed)
    cells = np.zeros((rows, cols), dtype=int)
    for v, r, c in placed:
        cells[r : r + views[v].rows, c : c + views[v].cols] += 1
    return (placed, (rows, cols)) if (cells == 1).all() else None


def _grow(grid: Bool[Tensor, "rows cols"], off_image: Bool[Tensor, "rows cols"], k: int) -> Bool[Tensor, "rows cols"]:
    """Binary dilation (k > 0: a cell joins iff a covered cell lies within Chebyshev distance k)
    or erosion (k < 0: a covered cell stays iff every cell within |k| is covered). Cells beyond
    the grid's edge and `off_image` cells count as covered for erosion, so an object touching
    the image's border is not eaten from the outside; `off_image` cells are never returned."""
    size = 2 * abs(k) + 1
    if k > 0:
        grown = F.max_pool2d(grid.float()[None, None], size, stride=1, padding=k)[0, 0] > 0
    else:
        padded = F.pad((grid | off_image).float()[None, None], (-k,) * 4, value=1.0)
        grown = -F.max_pool2d(-padded, size, stride=1)[0, 0] > 0
    return grown & ~off_image


def _clip_boxes(boxes: Float[np.ndarray, "n 4"], size: tuple[int, int]) -> Float[np.ndarray, "n 4"]:
    width, height = size
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


@dataclass
class VLMInput:
    """Everything one forward pass needs, for a batch of (image, prompt) pairs.

    `input_ids`, `attention_mask` (1 = real token; batches are left-padded) and `position_ids`
    (`cumsum(attention_mask) - 1`, 1 at padding, as Hugging Face's `generate` computes them) are
    `[batch, pos]`; `pixel_values` is `[view, channel, height, width]` with every view of every
    image in order. `text` holds the rendered prompts (after the chat template).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "view channel height width"]
    layout: ImageLayout
    text: list[str] = field(default_factory=list)
    images: list = field(default_factory=list, repr=False)  # the original PIL images, for plotting
    answer_mask: Bool[Tensor, "batch pos"] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def shape(self) -> torch.Size:
        """`[batch, pos]`, the token grid's shape (what transformer_lens's patching reads of tokens)."""
        return self.input_ids.shape

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> VLMInput:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            pixel_values=self.pixel_values.to(device),
            answer_mask=None if self.answer_mask is None else self.answer_mask.to(device),
        )

    def image_token_mask(self) -> Bool[Tensor, "batch pos"]:
        """True at the positions that receive image features."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        mask[self.layout.batch.to(mask.device), self.layout.position.to(mask.device)] = True
        return mask

    def last_image_position(self) -> Int[Tensor, "batch"]:
        """Per batch row, the position of its last image token (-1 if it has none)."""
        last = torch.full((len(self),), -1, dtype=torch.long)
        last.scatter_reduce_(0, self.layout.batch, self.layout.position, reduce="amax")
        return last


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """`cumsum(mask) - 1`, with 1 at padding: what Hugging Face's `generate` passes."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)
