"""Image collections: the plain images a mean embedding or a position probe is computed over
(PAPER_PROTOCOL §1.4: one mean over ImageNet val; §1.7: probes on 50,000 ImageNet images, scored
on 10,000), read one image at a time.

    images = ImageFolder("imagenet/val")        # flat, or one subfolder per class, at any depth
    images = DatasetImages(dataset, "image")    # a `datasets` Dataset or IterableDataset (streamed)
    images = open_collection("hf:ILSVRC/imagenet-1k", split="validation")   # or a folder path
    train, test = split_collection(images, 50_000, 10_000, seed=0)
    mean = iv.compute_mean_embedding(model, images)      # records which images it read

Each image has a key, recorded as it is read (`ImagesUsed`): the file's path relative to the
folder and its size, or the dataset row; a plain PIL image is keyed by a hash of its pixels. A
saved result carries the count and a digest of the keys, with the collection's source.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})


class ImageFolder:
    """Every image file under `root`, recursively, in the order of their relative paths; hidden
    files and folders are skipped. `files` (relative path, size) restricts it to those."""

    def __init__(self, root: str | Path, files: Sequence[tuple[str, int]] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = list(files) if files is not None else _list_images(self.root)
        if not self.files:
            raise ValueError(f"no images under {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, in subfolders too)")

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Image.Image]:
        return (image for _, image in self.keyed())

    def keyed(self) -> Iterator[tuple[str, Image.Image]]:
        for relative, size in self.files:
            with Image.open(self.root / relative) as image:
                yield f"{relative}:{size}", image.convert("RGB")

    def source(self) -> dict[str, Any]:
        return {"source": "folder", "root": str(self.root.resolve())}

    def subset(self, positions: Sequence[int]) -> ImageFolder:
        return ImageFolder(self.root, [self.files[i] for i in positions])


def _list_images(root: Path) -> list[tuple[str, int]]:
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(found)


class DatasetImages:
    """The `image_column` of a Hugging Face `datasets` dataset: a map-style `Dataset` (rows
    `positions`, default all) or an `IterableDataset`, streamed (rows `start` to `start + limit`).
    `name` is recorded as its source (default: the dataset's own name, config and split)."""

    def __init__(self, dataset: Any, image_column: str = "image", *, name: str | None = None,
                 positions: Sequence[int] | None = None, start: int = 0, limit: int | None = None):  # fmt: skip
        columns = getattr(dataset, "column_names", None)
        if columns is not None and image_column not in columns:
            raise ValueError(f"the dataset has no column {image_column!r}; its columns are {columns}")
        self.dataset, self.image_column, self.name = dataset, image_column, name or _dataset_name(dataset)
        self.streamed = not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
        if self.streamed and positions is not None:
            raise ValueError("a streamed dataset is read in order: give start and limit, not positions")
        if not self.streamed:
            positions = range(len(dataset)) if positions is None else positions
            positions = list(positions)[start:][:limit]
        self.positions, self.start, self.limit = positions, start, limit

    def __len__(self) -> int:
        if self.positions is None:
            raise TypeError("a streamed dataset's length is not known before it is read (give a limit)")
        return len(self.positions)

    def __iter__(self) -> Iterator[Image.Image]:
        return (image for _, image in self.keyed())

    def keyed(self) -> Iterator[tuple[str, Image.Image]]:
        if self.positions is not None:
            rows = ((i, self.dataset[int(i)]) for i in self.positions)
        else:
            stop = None if self.limit is None else self.start + self.limit
            rows = zip(itertools.count(self.start), itertools.islice(self.dataset, self.start, stop))
        for index, row in rows:
            yield f"row {index}", _as_image(row[self.image_column], index)

    def source(self) -> dict[str, Any]:
        return {"source": "datasets", "dataset": self.name, "fingerprint": getattr(self.dataset, "_fingerprint", None)}

    def subset(self, positions: Sequence[int]) -> DatasetImages:
        if self.positions is None:
            raise ValueError("a streamed dataset is read in order: give start and limit, not positions")
        return DatasetImages(self.dataset, self.image_column, name=self.name, positions=[self.positions[i] for i in positions])


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    parts = [getattr(info, "dataset_name", None), getattr(info, "config_name", None), getattr(dataset, "split", None)]
    return "/".join(str(p) for p in parts if p) or type(dataset).__name__


def _as_image(value: Any, index: int) -> Image.Image:
    """A decoded `datasets.Image` cell (PIL), or an undecoded one ({"bytes", "path"})."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
            return image.convert("RGB")
    raise TypeError(f"row {index}: the image column holds a {type(value).__name__}, not an image")


ImageCollection = ImageFolder | DatasetImages


def open_collection(spec: str | Path, *, split: str | None = None, image_column: str = "image", limit: int | None = None):
    """An image collection from a command-line spec: a folder of images; a folder a `datasets`
    dataset was saved to (`save_to_disk`); or `hf:NAME[:CONFIG]`, a dataset of the hub or a local
    folder of data files, streamed (`split` needed). `limit`: the first images only."""
    spec = str(spec)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not split:
            raise ValueError(f"{spec}: name the dataset's split (e.g. split='validation', --split validation)")
        datasets = _import_datasets()
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        return DatasetImages(stream, image_column, name=f"{name}{':' + config if config else ''}/{split}", limit=limit)
    path = Path(spec)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = _import_datasets().load_from_disk(str(path))
        if split is not None or hasattr(dataset, "keys"):  # a DatasetDict
            dataset = dataset[split or "train"]
        return DatasetImages(dataset, image_column, name=str(path.resolve()), limit=limit)
    folder = ImageFolder(path)
    return folder.subset(range(min(limit, len(folder)))) if limit is not None else folder


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading a Hugging Face dataset needs `datasets`: pip install datasets "
                          "(or pip install 'hooked_vlm[datasets]')") from error  # fmt: skip
    return datasets


def sample_collection(images, n: int, *, seed: int = 0):
    """`n` images of `images`: a seeded random draw from a folder or a map-style dataset, the
    first `n` rows of a streamed one; all of them when it holds `n` or fewer."""
    if isinstance(images, DatasetImages) and images.streamed:
        return DatasetImages(images.dataset, images.image_column, name=images.name, start=images.start, limit=n)
    if len(images) <= n:
        return images
    return images.subset(np.random.default_rng(seed).permutation(len(images))[:n].tolist())


def split_collection(images, n_train: int, n_test: int, *, seed: int = 0):
    """Two disjoint parts of `images`, `n_train` and `n_test` images: a seeded random draw from a
    folder or a map-style dataset (a class-sorted folder is not split by class), the first
    `n_train` rows and the next `n_test` of a streamed one."""
    if isinstance(images, DatasetImages) and images.streamed:
        return (DatasetImages(images.dataset, images.image_column, name=images.name, start=images.start, limit=n_train),
                DatasetImages(images.dataset, images.image_column, name=images.name, start=images.start + n_train, limit=n_test))  # fmt: skip
    if len(images) < n_train + n_test:
        raise ValueError(f"the collection holds {len(images)} images, fewer than {n_train} + {n_test}")
    order = np.random.default_rng(seed).permutation(len(images))
    return images.subset(order[:n_train].tolist()), images.subset(order[n_train : n_train + n_test].tolist())


class ImagesUsed:
    """Iterate over `images` (a collection, PIL images, paths, or a dataset of samples) and keep
    what a result records of them: how many were read and a digest of their keys, in order."""

    def __init__(self, images: Iterable):
        self.images, self.count = images, 0
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[Image.Image]:
        for key, image in keyed_images(self.images):
            self.count += 1
            self._digest.update(key.encode() + b"\n")
            yield image

    def provenance(self) -> dict[str, Any]:
        if hasattr(self.images, "source"):
            source = self.images.source()
        elif isinstance(self.images, (list, tuple)):  # PIL images, paths, or items of a dataset
            kinds = sorted({type(item).__name__ for item in self.images})
            source = {"source": f"a list of {', '.join(kinds) or 'nothing'}"}
        else:  # a dataset of samples, whose repr says how to make it again
            source = {"source": repr(self.images)[:300]}
        return source | {"count": self.count, "digest": self._digest.hexdigest()[:16]}


def keyed_images(images: Iterable) -> Iterator[tuple[str, Image.Image]]:
    """(key, image) for every image of a collection, of an iterable of PIL images or paths, or of
    a dataset of samples (`experiments.as_samples`: keyed by sample id)."""
    if hasattr(images, "keyed"):
        yield from images.keyed()
        return
    items = iter(images)
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if isinstance(first, (Image.Image, str, Path)):
        for item in items:
            if isinstance(item, Image.Image):
                yield _pixels_key(item), item
            else:
                with Image.open(item) as image:
                    yield str(item), image.convert("RGB")
    else:
        from hooked_vlm.experiments.data import as_samples

        for sample in as_samples(items):
            yield sample.id, sample.image


def _pixels_key(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest()[:16]


def describe_collection(images: Any) -> dict[str, Any]:
    """What a run manifest records of an image set, without reading its images: its source and
    the count and hash of its keys (file names and sizes, dataset rows, sample ids)."""
    from hooked_vlm.runs import describe_ids

    if isinstance(images, ImageFolder):
        return images.source() | describe_ids([f"{relative}:{size}" for relative, size in images.files])
    if isinstance(images, DatasetImages):
        rows = images.positions if images.positions is not None else (images.start, images.limit)
        return images.source() | {"rows": describe_ids([str(row) for row in rows]) if images.positions is not None else rows}
    if isinstance(images, (list, tuple)) and all(isinstance(item, (str, Path)) for item in images):
        return {"source": "paths"} | describe_ids([str(item) for item in images])
    if isinstance(images, (list, tuple)) and all(isinstance(item, Image.Image) for item in images):
        return {"source": "PIL images"} | describe_ids([_pixels_key(item) for item in images])
    from hooked_vlm.experiments.data import sample_sources

    sources = sample_sources(images, sample="first")  # `.data`: a hash of the samples' annotations and pixels
    return {"source": "samples"} | describe_ids([sample_id for sample_id, _ in sources]) | sources.data


def known_length(images: Any) -> int | None:
    """The number of images when it is known without reading them (for progress bars)."""
    try:
        return len(images)
    except TypeError:
        return None
