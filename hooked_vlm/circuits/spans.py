"""Position spans: edges read per span of positions, such as the object's image tokens.

Summed over every position, an edge mixes what a head does at the object's tokens with what it
does at the question's. With spans, every edge u → v gets one score per span s — the part of
Σ (ã_u − a_u)·∂M/∂x_v at the positions of s — and a circuit keeps (edge, span) pairs. The span
scores of an edge add up to its position-summed score, because spans partition the positions:
every real (unpadded) position is in exactly one span, which `Spans` checks.

`Spans.from_layout` builds the VLM spans from the image-token map: `prefix` (text before the
image), `object` (image tokens over the object's box or mask, grown by `dilation` rings),
`image` (the other image tokens), `question` (text after the image, up to the answer) and
`answer` (the teacher-forced answer and what follows it). In the vision tower, the object's
patches (those the object's image tokens are computed from) are `object` and every other
position (CLS included) is `image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hooked_vlm.inputs import Box, VLMInput

VLM_SPANS = ("prefix", "object", "image", "question", "answer")


@dataclass
class Spans:
    """Span names and each position's span: `language` `[batch, pos]`, `vision` `[view, vision_pos]`
    (None: no vision-tower spans; then a graph over the vision tower cannot use these spans)."""

    names: tuple[str, ...]
    language: Int[Tensor, "batch pos"]
    vision: Int[Tensor, "view vision_pos"] | None = None

    @classmethod
    def from_masks(cls, masks: Mapping[str, Bool[Tensor, "batch pos"]], inputs: VLMInput) -> Spans:
        """Spans from one boolean mask per name over the language model's positions. They must
        partition the real positions: each in exactly one span (padding may be in none)."""
        names = tuple(masks)
        if not names:
            raise ValueError("no spans given")
        stacked = torch.stack([torch.as_tensor(m, dtype=torch.bool).cpu() for m in masks.values()])
        if stacked.shape[1:] != inputs.input_ids.shape:
            raise ValueError(f"span masks are {tuple(stacked.shape[1:])} but the inputs {tuple(inputs.input_ids.shape)}")
        real = inputs.attention_mask.cpu().bool()
        count = stacked.sum(0)
        _check_partition(count, real, names, stacked)
        index = stacked.float().argmax(0)
        return cls(names, index)

    @classmethod
    def from_layout(cls, model, inputs: VLMInput, *, box: Box | None = None, mask: np.ndarray | None = None,
                    dilation: int = 0) -> Spans:  # fmt: skip
        """The VLM spans (module docstring) of a batch-1 input, the object given as a pixel box
        or mask of the original image."""
        if len(inputs) != 1:
            raise ValueError(f"spans from the layout take one input (batch 1), got {len(inputs)}")
        if (box is None) == (mask is None):
            raise ValueError("give the object as exactly one of box and mask")
        layout = inputs.layout
        object_positions = (layout.box_to_positions(box, dilation=dilation) if box is not None
                            else layout.mask_to_positions(mask, dilation=dilation))  # fmt: skip
        n = inputs.input_ids.shape[1]
        image = torch.zeros(n, dtype=torch.bool)
        image[layout.position] = True
        obj = torch.zeros(n, dtype=torch.bool)
        obj[object_positions] = True
        first_image, after_image = int(layout.position.min()), int(layout.position.max()) + 1
        answer = torch.zeros(n, dtype=torch.bool)
        if inputs.answer_mask is not None and inputs.answer_mask.any():
            answer[int(inputs.answer_mask[0].nonzero()[0]) :] = True
        positions = torch.arange(n)
        text = ~image
        masks = {"prefix": text & (positions < first_image), "object": obj, "image": image & ~obj,
                 "question": text & (positions >= after_image) & ~answer, "answer": answer}  # fmt: skip
        real = inputs.attention_mask[0].cpu().bool()
        spans = cls.from_masks({k: (v & real)[None] for k, v in masks.items()}, inputs)
        spans.vision = _vision_index(model, layout, object_positions, spans.names)
        return spans

    def check(self, inputs: VLMInput) -> None:
        """A clear error unless this span map fits `inputs` and partitions its positions."""
        if tuple(self.language.shape) != tuple(inputs.input_ids.shape):
            raise ValueError(f"spans cover positions {tuple(self.language.shape)} but the inputs are {tuple(inputs.input_ids.shape)}")
        real = inputs.attention_mask.cpu().bool()
        index = self.language.cpu()
        if ((index < 0) | (index >= len(self.names)))[real].any():
            raise ValueError("spans do not partition the positions: some real position is in no span")
        if self.vision is None:
            return
        if self.vision.dim() != 2 or len(self.vision) != len(inputs.pixel_values):
            raise ValueError(f"vision spans are {tuple(self.vision.shape)}, [view, vision_pos] with one row per view: "
                             f"the inputs have {len(inputs.pixel_values)} views")  # fmt: skip
        if ((self.vision < 0) | (self.vision >= len(self.names))).any():
            raise ValueError("spans do not partition the vision positions: some position is in no span")

    def check_model(self, model) -> None:
        """A clear error unless the vision spans have a column per vision-tower position of `model`."""
        if self.vision is not None and self.vision.shape[1] != vision_positions(model):
            raise ValueError(f"vision spans cover {self.vision.shape[1]} positions per view; "
                             f"the model's vision tower has {vision_positions(model)} (patches and CLS)")  # fmt: skip

    def masks(self) -> dict[str, list[Tensor]]:
        out = {"language": [self.language == k for k in range(len(self.names))]}
        if self.vision is not None:
            out["vision"] = [self.vision == k for k in range(len(self.names))]
        return out

    def index(self) -> dict[str, Tensor]:
        """Each position's span, per tower (vision: views flattened side by side, `[1, view * vision_pos]`)."""
        out = {"language": self.language.clamp(min=0)}
        if self.vision is not None:
            out["vision"] = self.vision.reshape(1, -1)
        return out


def _check_partition(count: Tensor, real: Tensor, names: Sequence[str], stacked: Tensor) -> None:
    if (count[real] == 0).any():
        where = (real & (count == 0)).nonzero()[:5].tolist()
        raise ValueError(f"spans do not partition the positions: (row, position) {where} in no span of {list(names)}")
    if (count > 1).any():
        row, pos = (count > 1).nonzero()[0].tolist()
        both = [names[k] for k in stacked[:, row, pos].nonzero().flatten().tolist()]
        raise ValueError(f"spans do not partition the positions: position {pos} of row {row} is in {both}")


def vision_positions(model) -> int:
    """Positions of the vision tower per view: the patches and CLS."""
    return model.vision.cfg.n_grid**2 + 1


def _vision_index(model, layout, object_positions: Tensor, names: tuple[str, ...]) -> Tensor:
    """Vision-tower positions of the object's image tokens -> "object"; every other -> "image"."""
    ratio = model.cfg.downsample_ratio
    merge = 1 if ratio is None else round(1 / ratio)
    n_views = sum(len(v) for v in layout.views)
    index = torch.full((n_views, vision_positions(model)), names.index("image"), dtype=torch.long)
    is_object = torch.isin(layout.position, object_positions.cpu())
    views = layout.view_index()[is_object]
    patches = layout.vision_positions(merge)[is_object]
    index[views[:, None].expand_as(patches), patches] = names.index("object")
    return index
