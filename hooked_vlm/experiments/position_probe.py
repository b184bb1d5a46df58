"""`position_probe`: can a linear classifier read an image token's row and column from its
activation, layer by layer, through the vision tower, the projector and the language model?
(PAPER_PROTOCOL §1.7: one linear classifier per axis and layer, trained on one image set and
evaluated on another; the paper: 10 epochs on 50,000 ImageNet images, scored on 10,000.)

The image sets are plain images (`hooked_vlm.data.collections`: a folder, a `datasets` dataset,
PIL images) or any dataset of samples. Features are not stored (PROTOCOL-AUDIT A6): the probes
train as the activations of each batch of images stream past (`streaming_probe`), so every epoch
runs the model over the training images again, unless the training set is small enough
(`STANDARDISE_IMAGES` images and `KEEP_ACTIVATIONS_BYTES`) to keep its activations in memory.

Output columns: `section` ("vision", "projector", "language"), `layer` (block index; 0 for the
projector), `hook`, `axis` ("row" | "col"), `accuracy` (held-out), `n_train` (tokens per epoch),
`n_test`, `chance` (1 / number of classes). `results.attrs["provenance"]`: the model's identity,
the images of each set (count and a digest of their keys), the dtype, the preprocessing and the
training settings. `run=`: recorded in a run directory, one item per site (`hooked_vlm.runs`).
"""

from __future__ import annotations

import datetime
import itertools
import zlib
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.data.collections import ImagesUsed, describe_collection, known_length
from hooked_vlm.experiments.data import batched, empty_dataset_error
from hooked_vlm.experiments.streaming_probe import RunningMoments, SiteProbe
from hooked_vlm.inputs import VLMInput
from hooked_vlm.provenance import code_version, model_identity, preprocessing_settings
from hooked_vlm.runs import Item, Run, Work, execute

PROBE_PROMPT = "Describe the image."
# tokens drawn per image and view in each pass: 50,000 images x 16 tokens is 800k tokens per
# epoch and site, plenty for a linear probe of 24-64 classes; every token of 50,000 images
# (576 or 1792 each) costs 36-110x the compute for the same probe (PROTOCOL-AUDIT A6)
TOKENS_PER_IMAGE = 16
STANDARDISE_IMAGES = 512  # the training images whose features set each site's standardisation
# a training set read whole by the standardisation pass is kept in memory up to this size, and
# its epochs reuse it instead of running the model again (small sets; large ones stream)
KEEP_ACTIVATIONS_BYTES = 2 * 1024**3


def probe_sites(model) -> list[tuple[str, int, str]]:
    """(section, layer, hook name) of every residual stream the probe reads."""
    sites = [("vision", l, f"vision.blocks.{l}.hook_resid_post") for l in range(model.cfg.vision.n_layers)]
    sites.append(("projector", 0, "projector.hook_out"))
    sites += [("language", l, f"blocks.{l}.hook_resid_post") for l in range(model.cfg.n_layers)]
    return sites


def position_probe(
    model,
    train_dataset: Any,
    test_dataset: Any,
    *,
    epochs: int = 10,
    tokens_per_image: int | None = TOKENS_PER_IMAGE,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Row/column decodability of image tokens at every layer (see the module docstring).

    Each site's features are standardised with the moments of the first `STANDARDISE_IMAGES`
    training images; then one softmax-regression probe per (site, axis) is trained with Adam for
    `epochs` passes (minibatches of 256 tokens within each batch of images) and scored on the
    test images. `tokens_per_image` draws that many tokens per image and view, afresh in every
    pass (None: every token). Vision-tower positions are the patch grid (CLS excluded); projector and language-model
    positions are the layout's (row, col) within each view. The token draws, the probes' initial
    weights and their minibatch order come from one generator per site, seeded with `seed` and the
    site: a site's result depends on the seed only (not on which other sites are computed with it,
    so a resumed or shared run gives the same table), and the global random state is untouched.
    `run`: a run directory to record the rows in and resume from (one item per site, both axes).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    for name, images in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
        if iter(images) is images:
            raise TypeError(f"{name} is a one-shot iterator; the probe reads its images once per epoch: pass a collection or a list")
    items = [Item(hook, hook, (section, layer, hook)) for section, layer, hook in probe_sites(model)]
    read: dict[str, Any] = {}  # the images this call read, for the provenance

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        sites = [item.payload for item in pending]
        generators = {hook: torch.Generator().manual_seed(zlib.crc32(f"{seed}/{hook}".encode())) for _, _, hook in sites}
        stream = _Stream(model, sites, tokens_per_image, batch_size, generators, progress)
        moments, kept, first = _standardise(stream, train_dataset)
        probes, n_train, used = _train(stream, train_dataset, moments, kept, first, epochs, lr, generators)
        scoring = ImagesUsed(test_dataset)
        correct = {hook: [0, 0, 0] for _, _, hook in sites}  # rows right, cols right, tokens
        for activations in stream.activations(scoring, "probe scoring"):
            for hook, (x, y) in stream.draw(activations).items():
                rows, cols = probes[hook].n_correct(x, y)
                correct[hook] = [correct[hook][0] + rows, correct[hook][1] + cols, correct[hook][2] + len(y)]
        read.update(train_images=used.provenance(), test_images=scoring.provenance())
        for section, layer, hook in sites:
            rows = []
            for axis_index, axis in enumerate(("row", "col")):
                rows.append(
                    {"section": section, "layer": layer, "hook": hook, "axis": axis,
                     "accuracy": correct[hook][axis_index] / correct[hook][2], "n_train": n_train[hook],
                     "n_test": correct[hook][2], "chance": 1 / stream.n_classes[hook][axis_index]}
                )  # fmt: skip
            yield hook, rows

    settings = {"epochs": epochs, "tokens_per_image": tokens_per_image, "lr": lr, "seed": seed, "prompt": PROBE_PROMPT,
                "train": describe_collection(train_dataset), "test": describe_collection(test_dataset)}  # fmt: skip
    work = Work("position_probe", items, compute, settings=settings, model=model, desc="probes", unit="site")
    results = execute(work, run, progress=progress)
    results.attrs["provenance"] = {
        "model": model_identity(model), "dtype": str(model.dtype).removeprefix("torch."),
        "preprocessing": preprocessing_settings(model), **settings, "hooked_vlm": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **read,  # none when a resumed run had nothing left to compute
    }  # fmt: skip
    return results


def _standardise(stream: _Stream, train_dataset):
    """Each site's running moments over the first `STANDARDISE_IMAGES` training images, the
    activations read for them when they are the whole training set and fit in
    `KEEP_ACTIVATIONS_BYTES` (else None), and the `ImagesUsed` of that pass."""
    moments = {hook: RunningMoments() for _, _, hook in stream.sites}
    first = ImagesUsed(train_dataset)
    kept, size = [], 0
    for activations in stream.activations(itertools.islice(first, STANDARDISE_IMAGES), "standardisation"):
        size += sum(x.numel() * x.element_size() for x, _, _ in activations.values())
        kept = kept if kept is not None and size <= KEEP_ACTIVATIONS_BYTES else None
        if kept is not None:
            kept.append(activations)
        for hook, (x, _) in stream.draw(activations).items():
            moments[hook].update(x)
    whole = first.count < STANDARDISE_IMAGES or known_length(train_dataset) == first.count
    return moments, kept if whole else None, first


def _train(stream: _Stream, train_dataset, moments, kept, first, epochs: int, lr: float, generators: dict[str, torch.Generator]):
    """The probes after `epochs` passes over the training images (the `kept` activations when
    there are, else the model run again), the tokens of one pass per site, and the images of one
    pass. The draws and steps are the same either way: keeping only saves forwards."""
    probes: dict[str, SiteProbe] = {}
    n_train: dict[str, int] = {}
    train_used = first if kept is not None else None
    for epoch in range(epochs):
        if kept is None:
            used = ImagesUsed(train_dataset)
            train_used = train_used or used
        batches = kept if kept is not None else stream.activations(used, f"probe training, epoch {epoch + 1}/{epochs}")
        for activations in batches:
            for hook, (x, y) in stream.draw(activations).items():
                if hook not in probes:
                    probes[hook] = SiteProbe(moments[hook], *stream.n_classes[hook], lr, generators[hook], x.device)
                probes[hook].train_on(x, y, generators[hook])
                if epoch == 0:
                    n_train[hook] = n_train.get(hook, 0) + len(y)
    return probes, n_train, train_used


class _Stream:
    """Run the model over images, a batch at a time, giving each site's activations of the image
    tokens with their (row, col) labels and views (`activations`), and draw the tokens a pass
    uses (`draw`); learns each site's number of row and column classes on the way."""

    def __init__(self, model, sites, tokens_per_image, batch_size, generators: dict[str, torch.Generator], progress):
        self.model, self.sites, self.tokens_per_image = model, sites, tokens_per_image
        self.batch_size, self.generators, self.progress = batch_size, generators, progress
        self.n_classes: dict[str, tuple[int, int]] = {}

    @torch.no_grad()
    def activations(self, images, what: str):
        names = {hook for _, _, hook in self.sites}
        n_images = known_length(getattr(images, "images", images))
        total = None if n_images is None else -(-n_images // self.batch_size)
        seen = False
        for batch in tqdm(batched(images, self.batch_size), desc=what, unit="batch", total=total, disable=not self.progress):
            inputs = self.model.prepare(batch, [PROBE_PROMPT] * len(batch))
            _, cache = self.model.run_with_cache(inputs, names_filter=lambda n: n in names)
            activations = {}
            for section, _, hook in self.sites:
                x, y, views = (_vision_tokens if section == "vision" else _image_tokens)(self.model, inputs, cache[hook], section)
                self._check_classes(hook, y)
                activations[hook] = (x, y, views)
            seen = True
            yield activations
        if not seen:
            raise empty_dataset_error()

    def draw(self, activations: dict[str, tuple[Tensor, Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per site: `tokens_per_image` random tokens of every view (all without it)."""
        drawn = {}
        for hook, (x, y, views) in activations.items():
            keep = _subsample(views, self.tokens_per_image, self.generators[hook])
            drawn[hook] = (x[keep.to(x.device)], y[keep])
        return drawn

    def _check_classes(self, hook: str, y: Int[Tensor, "n 2"]) -> None:
        """Every view is a full grid, so the first batch shows every row and column."""
        n = (int(y[:, 0].max()) + 1, int(y[:, 1].max()) + 1)
        known = self.n_classes.setdefault(hook, n)
        if n[0] > known[0] or n[1] > known[1]:
            raise ValueError(f"{hook}: a grid of {n} rows and columns after one of {known}; the probe's classes are fixed")


# Each extractor returns features `[n, d]`, labels `[n, 2]` (row, col) and each token's view of
# the batch `[n]` (one id per image and view), which `_subsample` draws from.
def _vision_tokens(model, inputs: VLMInput, acts: Float[Tensor, "view token d"], section: str):
    grid = model.cfg.vision.n_grid
    patches = acts[:, 1:]  # CLS first
    rows, cols = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    x = patches.reshape(-1, patches.shape[-1])
    y = torch.stack([rows, cols], -1).repeat(acts.shape[0], 1)
    views = torch.arange(acts.shape[0]).repeat_interleave(grid * grid)  # the tower runs every view of the batch
    return x, y, views


def _image_tokens(model, inputs: VLMInput, acts: Tensor, section: str):
    layout = inputs.layout
    grid_tokens = layout.row >= 0
    if section == "projector":  # [view, token, d] in layout order (views of every image, in order)
        x = acts.reshape(-1, acts.shape[-1])[: len(layout)][grid_tokens.to(acts.device)]
    else:  # [batch, pos, d] at the layout's positions
        x = acts[layout.batch, layout.position][grid_tokens]
    y = torch.stack([layout.row[grid_tokens], layout.col[grid_tokens]], -1)
    return x, y, layout.view_index()[grid_tokens]


def _subsample(views: Int[Tensor, "n"], k: int | None, generator: torch.Generator) -> Int[Tensor, "m"]:
    """Indices of `k` random tokens of every view (all of a view's tokens if it has fewer)."""
    if k is None:
        return torch.arange(len(views))
    chosen = []
    for view in torch.unique(views):  # sorted: the draws do not depend on the order tokens come in
        members = torch.nonzero(views == view).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen) if chosen else torch.arange(0)
