"""One sample type for every experiment, whatever the dataset.

A `Sample` is one queried object: the image, the object's class, box (checked at construction
to lie inside the image) and mask, the classes the list prompt offers, and (when there is one)
the image with the object removed — the source/base pair of causal mediation. `as_samples`
adapts the synthetic dataset, a filtered COCO subset, a list of COCO object-removed pairs, or a
list of samples; images are loaded one sample at a time. `sample_sources` gives each sample's id
with a loader, so that a resumed run (`hooked_vlm.runs`) loads only the samples it still needs.

Subsets (PROTOCOL-AUDIT A1): COCO's annotation file lists objects grouped by category, so its
first N objects are one or two classes. `limit` therefore draws, by default, a seeded random
subset (`sample="random"`, `sample_seed`), or a class-stratified one (`"stratified"`: the classes
take turns, each class's objects in a seeded random order), or the first N in file order
(`"first"`). The chosen samples keep the dataset's order; without `limit` every sample is used.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

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
    image_id: str | None = None  # the image it lies in (several objects may share one); None: its own
    area: float | None = None  # object pixels (COCO's `area`); None: counted from the mask when asked

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

    @property
    def image_key(self) -> str:
        """The image's identity: samples with the same key show the same image."""
        return self.image_id if self.image_id is not None else self.id

    @property
    def object_area(self) -> float:
        return float(self.area) if self.area is not None else float(self.mask.sum())


SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's size classes (pixels of the object's mask)


def size_class(area: float) -> str:
    """COCO's size class of an object of `area` pixels: "small" (< 32^2), "medium" (< 96^2) or
    "large" (the paper's Figure 10 breaks InternVL's view ablation down by it)."""
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


SampleMode = Literal["first", "random", "stratified"]
SAMPLE_MODES: tuple[str, ...] = ("first", "random", "stratified")


def as_samples(dataset: Any, *, choices: Iterable[str] | None = None) -> Iterator[Sample]:
    """Samples from a `SyntheticLocalization`, a `CocoSubset`, a list of `ObjectRemovedPair`, or
    samples. `choices` overrides the list prompt's classes (default: every class of the dataset)."""
    for _, load in iter_sources(dataset, choices=choices):
        yield load()


def chosen_samples(dataset: Any, limit: int | None = None, *, sample: SampleMode = "random", sample_seed: int = 0) -> Iterator[Sample]:
    """The samples `sample_sources` chooses, loaded one at a time."""
    for _, load in sample_sources(dataset, limit, sample=sample, sample_seed=sample_seed):
        yield load()


class Sources(list):
    """`sample_sources`' (sample id, loader) pairs, and `data`: what the samples are, for a run's
    manifest (`hooked_vlm.runs` compares it on resume). Ids alone do not say it: a synthetic set's
    are `test-0`, `test-1`, ... whatever its seed."""

    def __init__(self, sources: Iterable[tuple[str, Callable[[], Sample]]], data: dict[str, Any]) -> None:
        super().__init__(sources)
        self.data = data


def sample_sources(dataset: Any, limit: int | None = None, *, sample: SampleMode = "random", sample_seed: int = 0) -> Sources:
    """(sample id, loader) of the samples `limit`, `sample` and `sample_seed` choose (see the
    module docstring), in the dataset's order, without loading any image (but "stratified" on
    a synthetic set, whose classes are known once drawn): a resumed run loads only the samples
    it still needs. `.data` describes them for a run's manifest. An empty dataset (or `limit=0`)
    is an error."""
    check_sampling(limit, sample)
    if sample == "first":
        found = list(itertools.islice(_sources(dataset), limit))
    else:
        every = list(_sources(dataset))
        chosen = _chosen(every, limit, sample, sample_seed)
        found = [source for index, source in enumerate(every) if index in chosen]
    if not found:
        raise empty_dataset_error()
    return Sources([(sample_id, load) for sample_id, load, _, _ in found], _data_identity(dataset, [f for *_, f in found]))


def _data_identity(dataset: Any, fingerprints: list[bytes]) -> dict[str, Any]:
    """A synthetic set by its seed, split and distribution (nothing rendered); any other dataset by
    a hash of its samples' fingerprints (`_fingerprint`), with the classes its list prompt offers."""
    from hooked_vlm.data.synthetic import SyntheticLocalization
    from hooked_vlm.runs import describe

    if isinstance(dataset, SyntheticLocalization):
        return {"synthetic": describe({"seed": dataset.seed, "split": dataset.split, "config": dataset.config})}
    digest = hashlib.sha256()
    for fingerprint in fingerprints:
        digest.update(hashlib.sha256(fingerprint).digest())
    return {"classes": list(_dataset_classes(dataset)), "samples_sha256": digest.hexdigest()[:16]}


def check_sampling(limit: int | None, sample: str) -> None:
    if sample not in SAMPLE_MODES:
        raise ValueError(f"unknown sample {sample!r}; expected one of {SAMPLE_MODES}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a count >= 0, got {limit!r}")


def _chosen(every: list, limit: int | None, sample: str, seed: int) -> set[int]:
    """The indices of the chosen sources (all of them when `limit` does not cut)."""
    if limit is None or limit >= len(every):
        return set(range(len(every)))
    generator = random.Random(seed)
    if sample == "random":
        return set(generator.sample(range(len(every)), limit))
    by_class: dict[str, list[int]] = {}
    for index, (_, _, class_of, _) in enumerate(every):
        by_class.setdefault(class_of(), []).append(index)
    queues = [generator.sample(indices, len(indices)) for _, indices in sorted(by_class.items())]
    generator.shuffle(queues)  # which classes get one more object when limit does not divide evenly
    taken: list[int] = []
    while len(taken) < limit:
        for queue in queues:
            if queue and len(taken) < limit:
                taken.append(queue.pop())
    return set(taken)


def iter_sources(dataset: Any, *, choices: Iterable[str] | None = None, classes: bool = False) -> Iterator[tuple]:
    """(sample id, loader) of every sample; with `classes`, (id, loader, class name getter)."""
    for sample_id, load, class_of, _ in _sources(dataset, choices=choices):
        yield (sample_id, load, class_of) if classes else (sample_id, load)


def _sources(dataset: Any, *, choices: Iterable[str] | None = None) -> Iterator[tuple[str, Callable[[], Sample], Callable[[], str], bytes]]:
    """(sample id, loader, class name getter, fingerprint) of each sample (see `_fingerprint`)."""
    from hooked_vlm.data.coco import CocoItem, ObjectRemovedPair
    from hooked_vlm.data.synthetic import SyntheticItem, SyntheticLocalization

    dataset_choices = tuple(choices) if choices is not None else _dataset_classes(dataset)
    if isinstance(dataset, SyntheticLocalization):  # ids without rendering: a scene is drawn when loaded
        for index in range(len(dataset)):
            load = lambda index=index: _synthetic_sample(dataset[index], choices, dataset_choices)  # noqa: E731
            yield f"{dataset.split}-{index}", load, lambda index=index: dataset[index].class_name, b""
        return
    for item in dataset:
        if isinstance(item, Sample):
            yield item.id, lambda item=item: item, lambda item=item: item.class_name, _fingerprint(item)
        elif isinstance(item, SyntheticItem):
            load = lambda item=item: _synthetic_sample(item, choices, dataset_choices)  # noqa: E731
            yield f"{item.split}-{item.index}", load, lambda item=item: item.class_name, _fingerprint(load())
        elif isinstance(item, (CocoItem, ObjectRemovedPair)):
            coco = item if isinstance(item, CocoItem) else item.item
            removed = "" if isinstance(item, CocoItem) else Path(item.removed_image_path).name
            fingerprint = repr((coco.image_path.name, coco.image_size, coco.class_name, coco.annotation_id, coco.box, removed))
            load = lambda item=item, c=dataset_choices: _coco_sample(item, c)  # noqa: E731
            yield f"coco-{coco.annotation_id}", load, lambda coco=coco: coco.class_name, fingerprint.encode()
        else:
            raise TypeError(f"cannot make a sample of a {type(item).__name__}")


def _fingerprint(sample: Sample) -> bytes:
    """What a sample in memory is: its annotations and its images' pixels. (A COCO item's is its
    annotation and file names: no image is read for it.)"""
    images = [image for image in (sample.image, sample.removed_image) if image is not None]
    text = repr((sample.id, sample.class_name, sample.box, sample.choices, [(im.mode, im.size) for im in images]))
    return text.encode() + b"".join(hashlib.sha256(image.tobytes()).digest() for image in images)


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
        image_id=f"coco-image-{coco.image_id}",
        area=coco.area,
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
