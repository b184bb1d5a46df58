"""`position_probe`: can a linear classifier read an image token's row and column from its
activation, layer by layer, through the vision tower, the projector and the language model?
(PAPER_PROTOCOL §1.7: one linear classifier per axis and layer, trained on one image set and
evaluated on another.)

Output columns: `section` ("vision", "projector", "language"), `layer` (block index; 0 for the
projector), `hook`, `axis` ("row" | "col"), `accuracy` (held-out), `n_train`, `n_test`,
`chance` (1 / number of classes).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.experiments.data import as_samples, batched, empty_dataset_error, sample_sources
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Item, Run, Work, describe_ids, execute

PROBE_PROMPT = "Describe the image."


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
    tokens_per_image: int | None = None,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Row/column decodability of image tokens at every layer (see the module docstring).

    Features are gathered once per image set (`tokens_per_image` samples that many tokens per
    image and view, to bound memory on large sets), then one softmax-regression probe per
    (site, axis) is trained with Adam for `epochs` passes and scored on the test set. Vision-tower
    positions are the patch grid (CLS excluded); projector and language-model positions are the
    layout's (row, col) within each view. The token draws, the probes' initial weights and their
    minibatch order come from one generator per site seeded with `seed` and the site: the result
    depends on the seed only, and the global random state is left untouched. `run`: a run
    directory to record the rows in and resume from (`hooked_vlm.runs`; one item per site, both
    axes; the features of the pending sites are gathered in one pass first, so a process of a
    launch runs every image through the model for its own sites).
    """
    train_ids, test_ids = ([sample_id for sample_id, _ in sample_sources(data)] for data in (train_dataset, test_dataset))
    items = [Item(hook, hook, (section, layer, hook)) for section, layer, hook in probe_sites(model)]

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        sites = [item.payload for item in pending]
        # one generator per site, so a site's probe does not depend on which others are computed with it
        generators = {hook: torch.Generator().manual_seed(zlib.crc32(f"{seed}/{hook}".encode())) for _, _, hook in sites}
        train = _gather(model, train_dataset, sites, tokens_per_image, batch_size, generators, progress, "train")
        test = _gather(model, test_dataset, sites, tokens_per_image, batch_size, generators, progress, "test")
        for section, layer, hook in sites:
            rows = []
            for axis_index, axis in enumerate(("row", "col")):
                x_train, y_train = train[hook]
                x_test, y_test = test[hook]
                n_classes = int(max(y_train[:, axis_index].max(), y_test[:, axis_index].max())) + 1
                probe = _fit(x_train, y_train[:, axis_index], n_classes, epochs, lr, generators[hook])
                accuracy = (probe(x_test).argmax(-1) == y_test[:, axis_index]).float().mean().item()
                rows.append(
                    {"section": section, "layer": layer, "hook": hook, "axis": axis, "accuracy": accuracy,
                     "n_train": len(y_train), "n_test": len(y_test), "chance": 1 / n_classes}
                )  # fmt: skip
            yield hook, rows

    settings = {"epochs": epochs, "tokens_per_image": tokens_per_image, "lr": lr, "seed": seed,
                "train": describe_ids(train_ids), "test": describe_ids(test_ids)}  # fmt: skip
    work = Work("position_probe", items, compute, settings=settings, model=model, desc="probes", unit="site")
    return execute(work, run, progress=progress)


@torch.no_grad()
def _gather(model, dataset, sites, tokens_per_image, batch_size, generators, progress, split) -> dict[str, tuple[Tensor, Tensor]]:
    """Per hook: features `[n, d]` (float32, CPU) and labels `[n, 2]` (row, col)."""
    names = {hook for _, _, hook in sites}
    features: dict[str, list[Tensor]] = {hook: [] for hook in names}
    labels: dict[str, list[Tensor]] = {hook: [] for hook in names}
    for batch in tqdm(batched(as_samples(dataset), batch_size), desc=f"probe features ({split})", disable=not progress):
        inputs = model.prepare([s.image for s in batch], [PROBE_PROMPT] * len(batch))
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names, device="cpu")
        for section, _, hook in sites:
            x, y, views = (_vision_tokens if section == "vision" else _image_tokens)(model, inputs, cache[hook], section)
            keep = _subsample(views, tokens_per_image, generators[hook])
            features[hook].append(x[keep].float())
            labels[hook].append(y[keep])
    if not any(labels.values()):
        raise empty_dataset_error()
    return {hook: (torch.cat(features[hook]), torch.cat(labels[hook])) for hook in names}


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


def _fit(x: Float[Tensor, "n d"], y: Int[Tensor, "n"], n_classes: int, epochs: int, lr: float, generator: torch.Generator):
    """A softmax-regression probe on standardised features (Adam, minibatches of 256)."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    # nn.Linear's own initialisation (U(-1/sqrt(d), 1/sqrt(d))), drawn from the experiment's
    # generator instead of the global one, so the fit depends on the seed alone
    linear = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], n_classes)
    bound = x.shape[1] ** -0.5
    with torch.no_grad():
        for parameter in (linear.weight, linear.bias):
            torch.nn.init.uniform_(parameter, -bound, bound, generator=generator)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    xs = (x - mean) / std
    with torch.enable_grad():
        for _ in range(epochs):
            for index in torch.randperm(len(y), generator=generator).split(256):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(linear(xs[index]), y[index]).backward()
                optimizer.step()
    return lambda features: linear((features - mean) / std).detach()
