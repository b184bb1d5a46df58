"""One sample type for every experiment, whatever the dataset.

A `Sample` is one queried object: the image, the object's class, box (checked at construction
to lie inside the image) and mask, the classes the list prompt offers, and (when there is one)
the image with the object removed — the source/base pair of causal mediation. `as_samples`
adapts the synthetic dataset, a filtered COCO subset, a list of COCO object-removed pairs, or a
list of samples; images are loaded one sample at a time. `sample_sources` gives each sample's id
with a loader, so that a resumed run (`hooked_vlm.runs`) loads only the samples it still needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from jaxtyping import Bool
from PIL import Image

from hooked_vlm.boxes import Box, check_box


@dataclass
class Sample:
    id: str
    image: Image.Image
    class_name: str
    box: Box  # (x1, y1, x2, y2) in the image's pixels
    mask_fn: Callable[[], Bool[np.ndarray, "height width"]] = field(repr=False)
    choices: tuple[str, ...] = ()  # classes offered by the list-classification prompt
    removed_image: Image.Image | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # a ground-truth box outside the image would be scored silently (IoU against a clipped box)
        try:
            check_box(self.box, self.image.size)
        except (ValueError, TypeError) as error:
            width, height = self.image.size
            raise ValueError(f"sample {self.id!r} (image {width}x{height}): bad ground-truth box: {error}") from None

    @property
    def mask(self) -> Bool[np.ndarray, "height width"]:
        return self.mask_fn()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.size


def as_samples(dataset: Any, *, choices: Iterable[str] | None = None) -> Iterator[Sample]:
    """Samples from a `SyntheticLocalization`, a `CocoSubset`, a list of `ObjectRemovedPair`, or
    samples. `choices` overrides the list prompt's classes (default: every class of the dataset)."""
    for _, load in iter_sources(dataset, choices=choices):
        yield load()


def sample_sources(dataset: Any, limit: int | None = None) -> list[tuple[str, Callable[[], Sample]]]:
    """(sample id, loader) of the first `limit` samples, without loading any image: a resumed run
    loads only the samples it still needs. An empty dataset is an error."""
    sources = list(itertools.islice(iter_sources(dataset), limit))
    if not sources:
        raise empty_dataset_error()
    return sources


def iter_sources(dataset: Any, *, choices: Iterable[str] | None = None) -> Iterator[tuple[str, Callable[[], Sample]]]:
    from hooked_vlm.data.coco import CocoItem, ObjectRemovedPair
    from hooked_vlm.data.synthetic import SyntheticItem, SyntheticLocalization

    dataset_choices = tuple(choices) if choices is not None else _dataset_classes(dataset)
    if isinstance(dataset, SyntheticLocalization):  # ids without rendering: a scene is drawn when loaded
        for index in range(len(dataset)):
            yield f"{dataset.split}-{index}", lambda index=index: _synthetic_sample(dataset[index], choices, dataset_choices)
        return
    for item in dataset:
        if isinstance(item, Sample):
            yield item.id, lambda item=item: item
        elif isinstance(item, SyntheticItem):
            yield f"{item.split}-{item.index}", lambda item=item: _synthetic_sample(item, choices, dataset_choices)
        elif isinstance(item, (CocoItem, ObjectRemovedPair)):
            coco = item if isinstance(item, CocoItem) else item.item
            yield f"coco-{coco.annotation_id}", lambda item=item, c=dataset_choices: _coco_sample(item, c)
        else:
            raise TypeError(f"cannot make a sample of a {type(item).__name__}")


def _synthetic_sample(item, choices: Iterable[str] | None, dataset_choices: tuple[str, ...]) -> Sample:
    choices = tuple(choices) if choices is not None else (item.list_choices or dataset_choices)
    return Sample(
        id=f"{item.split}-{item.index}",
        image=item.image,
        class_name=item.class_name,
        box=item.box,
        mask_fn=lambda item=item: item.mask,
        choices=choices,
        removed_image=item.removed_image,
    )


def _coco_sample(item, choices: tuple[str, ...]) -> Sample:
    from hooked_vlm.data.coco import CocoItem

    coco = item if isinstance(item, CocoItem) else item.item
    removed = None
    if not isinstance(item, CocoItem):
        with Image.open(item.removed_image_path) as image:
            removed = image.convert("RGB")
    return Sample(
        id=f"coco-{coco.annotation_id}",
        image=coco.load_image(),
        class_name=coco.class_name,
        box=coco.box,
        mask_fn=coco.mask,
        choices=choices,
        removed_image=removed,
    )


def _dataset_classes(dataset: Any) -> tuple[str, ...]:
    for attribute in ("class_names", "classes"):
        value = getattr(dataset, attribute, None)
        if value is not None and not callable(value):
            return tuple(value)
    return ()


def empty_dataset_error() -> ValueError:
    """What every experiment raises when its dataset (after `limit`) holds no sample."""
    return ValueError("the dataset holds no sample")


def batched(samples: Iterable[Sample], batch_size: int) -> Iterator[list[Sample]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
