"""A synthetic object-localization dataset on which tiny VLMs can be trained in minutes.

Each image shows one **target** object (a shape in a colour, e.g. "red circle") among a few
**distractors** of other classes on a grey, mildly textured background. All classes in an image
are distinct, so "the red circle" is unique, but distractors may share the target's colour or
its shape: naming the target's box needs the colour *and* the shape bound at one place, so a
model must localize the object rather than guess from global colour statistics.

Every item also carries its **object-removed twin**: the same scene rendered without the target.
It plays the role of the paper's LaMa-inpainted base image in causal mediation (§1.9): it differs
from the original only inside the target's mask plus at most a one-pixel antialiasing rim.

Item ``i`` depends only on ``(seed, split, i)``, so any item can be regenerated on its own and
splits with different names never share a random stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, UInt8
from PIL import Image

from hooked_vlm.boxes import Box, Family, Frame, ImageSize
from hooked_vlm.data import prompts
from hooked_vlm.data.shapes import SHAPES, coverage, dilate_mask, mask_box

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
    "cyan": (40, 200, 210), "white": (245, 245, 245),
}
DEFAULT_SHAPES: tuple[str, ...] = SHAPES[:6]
DEFAULT_COLOURS: tuple[str, ...] = tuple(COLOURS)[:6]

# Background grey level range; far enough from every colour above that each mask pixel
# (alpha >= 0.5) differs from the removed twin by dozens of levels.
_BACKGROUND_LEVELS = (95, 145)
_TEXTURE_AMPLITUDE = 12.0
_GRAIN_AMPLITUDE = 3.0
_PLACEMENT_TRIES = 50
_MIN_OBJECT_PIXELS = 4


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that shapes the distribution of scenes (not the seed or the split).

    ``image_sizes``: (width, height) pairs; each item draws one uniformly, so a list of sizes
    gives random aspect ratios. ``n_distractors``: an int or an inclusive (min, max) range.
    ``object_size``: inclusive (min, max) side of an object's bounding square; numbers <= 1 are
    fractions of the image's shorter side, larger numbers are pixels. ``min_gap``: pixels
    between objects' bounding squares (3 keeps their one-pixel-dilated masks disjoint).
    ``n_list_choices``: None lists every class in the list-classification prompt (as the paper
    lists all COCO categories); an int lists the present classes plus random absent ones.
    """

    image_sizes: tuple[tuple[int, int], ...] = ((112, 112),)
    n_distractors: int | tuple[int, int] = (1, 3)
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    object_size: tuple[float, float] = (0.2, 0.4)
    background: str = "textured"  # "textured" | "plain"
    antialias: bool = True
    colour_jitter: int = 12
    min_gap: int = 3
    n_list_choices: int | None = None

    def __post_init__(self) -> None:
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS))
        if unknown:
            raise ValueError(f"unknown shapes or colours {sorted(unknown)}; "
                             f"known shapes {SHAPES}, colours {tuple(COLOURS)}")
        if not self.image_sizes:
            raise ValueError("image_sizes needs at least one (width, height)")
        if self.background not in ("textured", "plain"):
            raise ValueError(f"background must be 'textured' or 'plain', got {self.background!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class name, colour-major: ("red circle", "red square", ...)."""
        return tuple(f"{c} {s}" for c in self.colours for s in self.shapes)


@dataclass(frozen=True)
class SceneObject:
    """One placed object: its class, exact mask and the alpha it is painted with."""

    colour: str
    shape: str
    rgb: tuple[int, int, int]
    mask: Bool[np.ndarray, "height width"] = field(repr=False)  # pixels with coverage >= 0.5
    alpha: Float[np.ndarray, "height width"] = field(repr=False)  # 0 outside dilate(mask, 1)

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> Box:
        """Tight pixel-edge box (x1, y1, x2, y2) of the mask."""
        return mask_box(self.mask)


@dataclass(frozen=True)
class SyntheticItem:
    """One scene: image, object-removed twin, target annotations and what regenerates it."""

    index: int
    seed: int
    split: str
    image: Image.Image
    removed_image: Image.Image
    objects: tuple[SceneObject, ...]  # the target first, then the distractors
    background: UInt8[np.ndarray, "height width 3"] = field(repr=False)  # shared by renderings
    list_choices: tuple[str, ...] = ()
    absent_class: str = ""  # a class not in the image, preferably sharing colour or shape

    @property
    def target(self) -> SceneObject:
        return self.objects[0]

    @property
    def box(self) -> Box:
        return self.target.box

    @property
    def mask(self) -> Bool[np.ndarray, "height width"]:
        return self.target.mask

    @property
    def class_name(self) -> str:
        return self.target.class_name

    @property
    def colour(self) -> str:
        return self.target.colour

    @property
    def shape(self) -> str:
        return self.target.shape

    @property
    def distractor_classes(self) -> tuple[str, ...]:
        return tuple(o.class_name for o in self.objects[1:])

    @property
    def image_size(self) -> ImageSize:
        """(width, height), PIL's order."""
        return self.image.size

    def render_without(self, k: int) -> Image.Image:
        """The scene without object ``k`` (0 is the target): a removed twin for any object."""
        return render(self.background, self.objects, exclude=k)

    def examples(self, family: Family, *, frame: Frame | None = None) -> list[TaskExample]:
        """The item's supervised examples for one model family, in a fixed order:

        localization of the target; list classification on the image and on the removed twin;
        binary "is there a {target}" on the image (Yes) and on the removed twin (No); binary
        for ``absent_class`` on the image (No), a hard negative sharing colour or shape.
        """
        present = [o.class_name for o in self.objects]
        loc = prompts.localization_answer(self.box, self.image_size, self.class_name,
                                          family=family, frame=frame)
        ask_target = prompts.binary_prompt(self.class_name)
        out = [
            TaskExample("localization", self.image, prompts.localization_prompt(self.class_name),
                        loc, object_removed=False),
            TaskExample("list", self.image, prompts.list_prompt(self.list_choices),
                        prompts.list_answer(present, self.list_choices), object_removed=False),
            TaskExample("list", self.removed_image, prompts.list_prompt(self.list_choices),
                        prompts.list_answer(present[1:], self.list_choices), object_removed=True),
            TaskExample("binary", self.image, ask_target, prompts.YES, object_removed=False),
            TaskExample("binary", self.removed_image, ask_target, prompts.NO, object_removed=True),
        ]
        if self.absent_class:
            out.append(TaskExample("binary", self.image, prompts.binary_prompt(self.absent_class),
                                   prompts.NO, object_removed=False))
        return out


def absent_in_target_colour(item: SyntheticItem, shapes: Sequence[str]) -> list[str]:
    """The target's colour in each of `shapes` that the image does not hold ("green circle"
    beside a green square target): the absent classes colour alone cannot rule out."""
    present = {o.class_name for o in item.objects}
    return [name for s in shapes if (name := f"{item.colour} {s}") not in present]


@dataclass(frozen=True)
class TaskExample:
    """One (image, prompt, answer) triple; ``object_removed`` marks the removed twin's image."""

    task: str  # "localization" | "list" | "binary"
    image: Image.Image
    prompt: str
    answer: str
    object_removed: bool


# --------------------------------------------------------------------------------------------
# Sampling and rendering scenes
# --------------------------------------------------------------------------------------------

def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one item; distinct (seed, split, index) give independent streams."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _background(rng: np.random.Generator, size: ImageSize,
                kind: str) -> UInt8[np.ndarray, "height width 3"]:
    """A grey canvas, optionally with smooth blotches and faint grain."""
    width, height = size
    level = rng.uniform(*_BACKGROUND_LEVELS)
    canvas = np.full((height, width, 3), level, dtype=np.float32)
    if kind == "textured":
        coarse = rng.uniform(-1, 1, size=(4, 4, 3)).astype(np.float32)
        blotches = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
            (width, height), Image.BILINEAR)) for c in range(3)], axis=-1)
        canvas += _TEXTURE_AMPLITUDE * blotches
        canvas += rng.uniform(-_GRAIN_AMPLITUDE, _GRAIN_AMPLITUDE, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _size_range(config: SyntheticConfig, image_size: ImageSize) -> tuple[float, float]:
    """Object size range in pixels for this image, capped so one object always fits."""
    shorter = min(image_size)
    lo, hi = (v * shorter if v <= 1 else float(v) for v in config.object_size)
    cap = shorter - 2.0
    return max(min(lo, cap), _MIN_OBJECT_PIXELS), max(min(hi, cap), _MIN_OBJECT_PIXELS)


def _place(rng: np.random.Generator, size: float, image_size: ImageSize,
           taken: list[Box], gap: float,
           ) -> tuple[float, float] | None:
    """A centre for a square of side ``size`` inside the image, ``gap`` px from ``taken``."""
    width, height = image_size
    half = size / 2
    for _ in range(_PLACEMENT_TRIES):
        cx = rng.uniform(half + 1, width - half - 1)
        cy = rng.uniform(half + 1, height - half - 1)
        square = (cx - half, cy - half, cx + half, cy + half)
        if all(square[0] >= t[2] + gap or square[2] + gap <= t[0] or
               square[1] >= t[3] + gap or square[3] + gap <= t[1] for t in taken):
            taken.append(square)
            return cx, cy
    return None


def _make_object(rng: np.random.Generator, config: SyntheticConfig, class_name: str,
                 centre: tuple[float, float], size: float, image_size: ImageSize,
                 ) -> SceneObject:
    """Rasterise one object and decide how it is painted."""
    colour, shape = class_name.split(" ", 1)
    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
    cover = coverage(shape, centre, size, image_size)
    mask = cover >= 0.5
    # Antialiasing is confined to a one-pixel rim so the removed twin stays local (a star's
    # thin tips would otherwise tint pixels two or three pixels away from the mask).
    alpha = cover * dilate_mask(mask, 1) if config.antialias else mask.astype(np.float32)
    return SceneObject(colour, shape, rgb, mask, alpha.astype(np.float32))


def render(background: UInt8[np.ndarray, "height width 3"], objects: Sequence[SceneObject],
           exclude: int | None = None) -> Image.Image:
    """Paint ``objects`` (all but index ``exclude``) over ``background``."""
    canvas = background.astype(np.float32)
    for k, obj in enumerate(objects):
        if k != exclude:
            a = obj.alpha[..., None]
            canvas = canvas * (1 - a) + np.asarray(obj.rgb, dtype=np.float32) * a
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")


def _pick_classes(rng: np.random.Generator, config: SyntheticConfig) -> list[str]:
    """Target first, then the distractors: distinct classes, so every class in an image is unique."""
    lo, hi = ((config.n_distractors,) * 2 if isinstance(config.n_distractors, int)
              else config.n_distractors)
    classes = list(config.classes)
    n = min(int(rng.integers(lo, hi + 1)), len(classes) - 1)
    order = [classes[i] for i in rng.permutation(len(classes))]
    return order[: n + 1]


def _absent_class(rng: np.random.Generator, config: SyntheticConfig, target: str,
                  present: set[str]) -> str:
    """A class not in the image, sharing the target's colour or shape when one exists."""
    colour, shape = target.split(" ", 1)
    absent = [c for c in config.classes if c not in present]
    near = [c for c in absent if c.startswith(colour + " ") or c.endswith(" " + shape)]
    pool = near or absent
    return pool[int(rng.integers(len(pool)))] if pool else ""


def _list_choices(rng: np.random.Generator, config: SyntheticConfig,
                  present: Sequence[str]) -> tuple[str, ...]:
    """Candidate classes for the list prompt (see ``SyntheticConfig.n_list_choices``)."""
    if config.n_list_choices is None:
        return config.classes
    absent = [c for c in config.classes if c not in present]
    n_absent = max(min(config.n_list_choices - len(present), len(absent)), 0)
    picked = list(present) + [absent[i] for i in rng.permutation(len(absent))[:n_absent]]
    return tuple(picked[i] for i in rng.permutation(len(picked)))


def generate_item(config: SyntheticConfig, seed: int, index: int,
                  split: str = "train") -> SyntheticItem:
    """Sample and render item ``index`` of the stream ``(seed, split)``.

    The target is placed first and always fits; a distractor that finds no free spot after
    ``_PLACEMENT_TRIES`` attempts is dropped, so crowded configs may yield fewer distractors.
    """
    rng = item_rng(seed, split, index)
    image_size = tuple(config.image_sizes[int(rng.integers(len(config.image_sizes)))])
    background = _background(rng, image_size, config.background)
    size_lo, size_hi = _size_range(config, image_size)
    taken: list[Box] = []  # bounding squares of the placed objects
    objects = []
    for class_name in _pick_classes(rng, config):
        size = rng.uniform(size_lo, size_hi)
        centre = _place(rng, size, image_size, taken, config.min_gap)
        if centre is not None:
            objects.append(_make_object(rng, config, class_name, centre, size, image_size))
    present = [o.class_name for o in objects]
    return SyntheticItem(
        index=index, seed=seed, split=split,
        image=render(background, objects), removed_image=render(background, objects, exclude=0),
        objects=tuple(objects), background=background,
        list_choices=_list_choices(rng, config, present),
        absent_class=_absent_class(rng, config, present[0], set(present)),
    )


class SyntheticLocalization(Sequence[SyntheticItem]):
    """``n`` synthetic localization items; ``ds[i]`` is rendered on demand from (seed, split, i).

    >>> ds = SyntheticLocalization(1000, seed=0, image_sizes=[(112, 56), (84, 168)])
    >>> val = ds.with_split("val", n=200)   # same distribution, a disjoint random stream
    """

    def __init__(self, n: int, seed: int = 0, *, split: str = "train",
                 image_sizes: Sequence[tuple[int, int]] = ((112, 112),),
                 n_distractors: int | tuple[int, int] = (1, 3),
                 shapes: Sequence[str] = DEFAULT_SHAPES,
                 colours: Sequence[str] = DEFAULT_COLOURS,
                 object_size: tuple[float, float] = (0.2, 0.4),
                 **options) -> None:
        """``options`` are the remaining ``SyntheticConfig`` fields (background, antialias, ...)."""
        self.n, self.seed, self.split = n, seed, split
        self.config = SyntheticConfig(
            image_sizes=tuple(tuple(s) for s in image_sizes), n_distractors=n_distractors,
            shapes=tuple(shapes), colours=tuple(colours), object_size=tuple(object_size),
            **options)

    @classmethod
    def from_config(cls, config: SyntheticConfig, n: int, seed: int = 0,
                    split: str = "train") -> SyntheticLocalization:
        """A dataset with an existing config (e.g. one read back from a training run)."""
        ds = cls.__new__(cls)
        ds.n, ds.seed, ds.split, ds.config = n, seed, split, config
        return ds

    def with_split(self, split: str, n: int | None = None) -> SyntheticLocalization:
        """The same distribution under another split name: a held-out, disjoint random stream."""
        return self.from_config(self.config, self.n if n is None else n, self.seed, split)

    def with_config(self, **changes) -> SyntheticLocalization:
        """The same (seed, split, n) with some config fields changed."""
        return self.from_config(replace(self.config, **changes), self.n, self.seed, self.split)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    def export_coco(self, out_dir: str | Path, **kwargs) -> Path:
        """Write the items in the COCO layout; see ``synthetic_coco.export_coco``."""
        from hooked_vlm.data.synthetic_coco import export_coco  # it imports this module

        return export_coco(self, out_dir, **kwargs)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> SyntheticItem:  # type: ignore[override]
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        return generate_item(self.config, self.seed, index % self.n, self.split)

    def __iter__(self) -> Iterator[SyntheticItem]:
        return (self[i] for i in range(self.n))

    def __repr__(self) -> str:
        return f"SyntheticLocalization(n={self.n}, seed={self.seed}, split={self.split!r}, {self.config})"


def text_corpus(dataset: Sequence[SyntheticItem], families: Sequence[Family] = prompts.FAMILIES,
                frame: Frame | None = None) -> Iterator[str]:
    """Every prompt and answer of ``dataset`` for ``families``: text to train a toy tokenizer on."""
    for item in dataset:
        for family in families:
            for example in item.examples(family, frame=frame):
                yield example.prompt
                yield example.answer


def vocabulary(config: SyntheticConfig = SyntheticConfig(),
               families: Sequence[Family] = prompts.FAMILIES) -> tuple[str, ...]:
    """Every word, digit, punctuation mark and tag that prompts and answers about ``config``'s
    classes can contain (see ``prompts.vocabulary``)."""
    return prompts.vocabulary(config.classes, families)
