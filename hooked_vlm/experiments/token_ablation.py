"""`token_ablation`: which image tokens does the answer need? (PAPER_PROTOCOL §1.4, Table 1;
with `views`, §1.6 Table 3.)

Chosen image tokens are overwritten at the language model's input (`hook_inputs_embeds`: after
the projector, before any positional term) by the global mean visual embedding — or zero or
noise — and the task is answered again. Token sets, per image:

- `object`: the object's mask on the token grid (every token overlapping it by >= 1 pixel),
  grown or shrunk by each `padding` (token rings in the image; InternVL's tiles joined, the
  thumbnail on its own); an object eroded away ablates nothing (`n_ablated` = 0).
- `random`: `fraction` of the image tokens of the chosen views, for each seed; for InternVL drawn
  view by view (each view loses the same share), seeded per sample.
- `register`: tokens whose embedding norm exceeds the mean + `register_sd` (sample) standard
  deviations of the norms of that image's tokens in the chosen views (§1.4.2).
- `ig`: the top `fraction` of the chosen views' tokens by Integrated Gradients attribution
  (`experiments.attribution`: target, baseline and steps are documented there), pooled over views.

Output columns: the `evaluate` columns of the task (`condition` names the condition, e.g.
"object+1", "random 8% s0"), then `strategy` ("baseline", "object", "random", "register",
"ig"), `padding` (object only), `fraction` (random and ig), `seed` (random), `views`, `fill`
("mean", "zero", "noise"), `n_ablated`, `n_image_tokens` (every view), `pct_ablated` (= 100
n_ablated / n_image_tokens), and for InternVL `n_ablated_global`, `n_ablated_local`,
`pct_ablated_global`, `pct_ablated_local` (% of that view kind's tokens, Table 1's "(13, 10)").
Inapplicable labels are NA. One row per query and condition.
"""

from __future__ import annotations

import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm import interventions as iv
from hooked_vlm.experiments._conditions import (
    Condition, check_choices, check_ints, check_task, check_views, conditions_work, count_columns, object_set,
    per_sample_seed, random_set, sample_rows, token_counts,
)  # fmt: skip
from hooked_vlm.experiments.attribution import (
    REDUCTIONS, TARGETS, Rank, Reduce, Target, integrated_gradients, teacher_forced_inputs, top_attributed,
)  # fmt: skip
from hooked_vlm.experiments.data import Sample, SampleMode, chosen_samples, empty_dataset_error
from hooked_vlm.inputs import VLMInput
from hooked_vlm.runs import Run, execute

STRATEGIES = ("object", "random", "register", "ig")
FILLS = ("mean", "zero", "noise")
Fill = Literal["mean", "zero", "noise"] | iv.MeanEmbedding
FRACTIONS = (0.01, 0.04, 0.08, 0.16, 0.24, 0.32, 0.48)  # §1.4: 1, 4, 8, 16, (24), 32, 48 %
PADDINGS = (-2, -1, 0, 1, 2)


def token_ablation(
    model,
    dataset: Any,
    *,
    task: Literal["localization", "list"] = "localization",
    strategies: Sequence[str] = STRATEGIES,
    paddings: Sequence[int] = PADDINGS,
    fractions: Sequence[float] = FRACTIONS,
    fill: Fill = "mean",
    mean: iv.MeanEmbedding | Float[Tensor, "d_model"] | str | Path | None = None,
    views: Literal["all", "global", "local"] = "all",
    seeds: Sequence[int] = (0, 1, 2),
    ig_steps: int = 50,
    ig_baseline: Literal["mean", "zero"] = "mean",
    ig_rank: Rank = "signed",
    ig_reduce: Reduce = "l1",
    ig_target: Target = "answer",
    register_sd: float = 2.0,
    batch_size: int = 8,
    limit: int | None = None,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    frame=None,
    max_new_tokens: int | None = None,
    match: str = "word",
    float_boxes: str = "official",
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """The baseline and every ablation condition on `dataset` (see the module docstring).

    `fill`: the replacement — "mean" (the paper: the global mean visual embedding, `mean`, a
    `MeanEmbedding`, a `[d_model]` tensor or a `save_mean` file; with `mean=None` it is
    computed over the dataset's images, with a warning, since the paper uses ImageNet-val),
    "zero", "noise" (seeded by the condition's seed, 0 if none, and each sample's id, per
    position counted from the sample's first token: a sample gets the same noise whatever its
    batch), or a `MeanEmbedding`.
    `ig_baseline` is IG's reference input: the same mean vector, or zero; `ig_reduce` how a
    token's attribution sums over d_model ("l1": sum of |.|, the reference code's; "sum":
    signed); `ig_target` what is attributed ("answer": the answer's mean log-probability, the
    class name's tokens without the end-of-turn; "first_logit": the class's first-token logit,
    list only; see `experiments.attribution`). `views` restricts
    every token set to InternVL's thumbnail ("global") or tiles ("local"); `n_image_tokens`
    still counts every view. `limit`, `sample`, `sample_seed`: which samples (a seeded random
    subset by default, `experiments.data.sample_sources`); the mean fallback averages the distinct
    images of the same samples. `frame`, `max_new_tokens`, `match`, `float_boxes`: `evaluate`'s.
    `run`: a run directory to record the rows in and resume from (`hooked_vlm.runs`; one item per
    condition and sample).
    """
    check_task(task)
    check_views(model, views)
    strategies = check_choices(strategies, STRATEGIES, "strategies")
    paddings = check_ints(paddings, "paddings") if "object" in strategies else []
    seeds = check_ints(seeds, "seeds") if "random" in strategies else []
    fractions = _check_fractions(fractions) if {"random", "ig"} & set(strategies) else []
    _check_ig(ig_steps, ig_baseline, ig_rank, ig_reduce, ig_target, task if "ig" in strategies else None)
    if not register_sd >= 0:
        raise ValueError(f"register_sd must be >= 0, got {register_sd!r}")
    if not isinstance(fill, iv.MeanEmbedding) and not (isinstance(fill, str) and fill in FILLS):
        raise ValueError(f"unknown fill {fill!r}; expected one of {FILLS} or a MeanEmbedding")
    fill_label = "mean" if isinstance(fill, iv.MeanEmbedding) else fill
    needs_mean = fill_label == "mean" or ("ig" in strategies and ig_baseline == "mean")
    mean_given = mean is not None or isinstance(fill, iv.MeanEmbedding)
    chosen = {"limit": limit, "sample": sample, "sample_seed": sample_seed}
    mean = _resolve_mean(model, dataset, fill, mean, needs_mean, chosen, batch_size, progress)
    value = mean if fill_label == "mean" else fill

    shared = {"views": views, "fill": fill_label}
    conditions = [Condition("baseline", {"strategy": "baseline", **shared}, _ablating(value, _nothing))]
    for padding in paddings:  # §1.4.1: the mask grown or shrunk by -2 .. +2 token rings
        select = _object_tokens(padding, views)
        labels = {"strategy": "object", "padding": padding, **shared}
        conditions.append(Condition(f"object{padding:+d}", labels, _ablating(value, select)))
    for fraction in fractions if "random" in strategies else []:
        for seed in seeds:  # §1.4.4: 3 seeds, mean +- sd
            labels = {"strategy": "random", "fraction": fraction, "seed": seed, **shared}
            select = _random_tokens(fraction, seed, views)
            conditions.append(Condition(f"random {100 * fraction:g}% s{seed}", labels, _ablating(value, select, seed)))
    if "register" in strategies:
        select = _register_tokens(views, register_sd)
        conditions.append(Condition("register", {"strategy": "register", **shared}, _ablating(value, select)))
    if "ig" in strategies:
        vector = mean.vector if isinstance(mean, iv.MeanEmbedding) else mean
        reference = vector if ig_baseline == "mean" else torch.zeros(model.cfg.text.d_model)
        attributions = _AttributionCache(task, reference, ig_steps, frame, ig_reduce, ig_target)
        for fraction in fractions:
            labels = {"strategy": "ig", "fraction": fraction, **shared}
            select = _top_attributed(attributions, fraction, views, ig_rank)
            conditions.append(Condition(f"ig {100 * fraction:g}%", labels, _ablating(value, select)))
    counts = count_columns(model, "ablated")
    settings = {
        "strategies": strategies, "paddings": paddings, "fractions": fractions, "seeds": seeds, "views": views,
        "fill": fill_label, "mean": mean if mean_given else ("the dataset's images" if needs_mean else None),
        "ig_steps": ig_steps, "ig_baseline": ig_baseline, "ig_rank": ig_rank, "ig_reduce": ig_reduce,
        "ig_target": ig_target, "register_sd": register_sd,
    }  # fmt: skip
    work = conditions_work(
        "token_ablation", model, dataset, task, conditions,
        columns=["strategy", "padding", "fraction", "seed", "views", "fill", *counts],
        int_columns=["padding", "seed", *(c for c in counts if c.startswith("n_"))],
        settings=settings, desc=f"token ablation ({task})",
        batch_size=batch_size, **chosen, frame=frame, max_new_tokens=max_new_tokens, match=match, float_boxes=float_boxes,
    )  # fmt: skip
    return execute(work, run, progress=progress)


# ---------------------------------------------------------------------------------- token sets
# Each selector is (model, inputs, samples) -> TokenSet, built from the batch's own layout.
def _ablating(value, select, seed: int = 0):
    def build(model, inputs: VLMInput, samples: list[Sample]):
        tokens = select(model, inputs, samples)
        hooks = []
        if tokens.mask.any():  # noise seeded per sample and counted from its first token: batch-independent
            seeds = [0] * inputs.input_ids.shape[0]
            for sample, row in zip(samples, sample_rows(inputs)):
                seeds[row] = per_sample_seed(seed, sample)
            hooks = iv.token_ablation(model, tokens, value, seed=seeds, inputs=inputs)
        return hooks, token_counts(model, inputs, tokens, "ablated")

    return build


def _nothing(model, inputs: VLMInput, samples: list[Sample]) -> iv.TokenSet:
    return iv.positions(inputs, {})


def _object_tokens(padding: int, views: str):
    return lambda model, inputs, samples: object_set(inputs, samples, padding, views)


def _random_tokens(fraction: float, seed: int, views: str):
    # k% of the chosen views' tokens, view by view for InternVL (each view loses the same share)
    def select(model, inputs: VLMInput, samples: list[Sample]) -> iv.TokenSet:
        return random_set(inputs, samples, fraction, seed, within=iv.image_tokens(inputs, views))

    return select


def _register_tokens(views: str, n_sd: float):
    return lambda model, inputs, samples: register_tokens(model, inputs, views=views, n_sd=n_sd)


def _top_attributed(attributions: _AttributionCache, fraction: float, views: str, rank: Rank):
    def select(model, inputs: VLMInput, samples: list[Sample]) -> iv.TokenSet:
        chosen = top_attributed(inputs, attributions(model, samples), fraction, views=views, rank=rank)
        return iv.positions(inputs, {row: p.tolist() for row, p in zip(sample_rows(inputs), chosen)})

    return select


@torch.no_grad()
def register_tokens(model, inputs: VLMInput, *, views: str = "all", n_sd: float = 2.0) -> iv.TokenSet:
    """Image tokens whose `hook_inputs_embeds` norm exceeds mean + `n_sd` standard deviations of
    the norms of the same image's tokens in `views` (§1.4.2; sample sd; the statistics are per
    image because register tokens are outliers within an image)."""
    embeds = model.embed_inputs(inputs.input_ids, model.encode_images(inputs.pixel_values), inputs.image_token_mask())
    layout, chosen = inputs.layout, {}
    for image in range(layout.n_images):
        row, positions = layout.image_batch_row[image], layout.positions(image, views)
        if len(positions) == 0:
            continue
        norms = embeds[row, positions.to(embeds.device)].float().norm(dim=-1).cpu()
        spread = norms.std() if len(norms) > 1 else torch.tensor(0.0)
        chosen[row] = positions[norms > norms.mean() + n_sd * spread].tolist()
    return iv.positions(inputs, chosen)


class _AttributionCache:
    """IG attributions per sample id, computed on first request and reused by every fraction."""

    def __init__(self, task: str, baseline: Float[Tensor, "d_model"], steps: int, frame, reduce: str, target: str) -> None:
        self.task, self.baseline, self.steps, self.frame = task, baseline, steps, frame
        self.reduce, self.target = reduce, target
        self.scores: dict[str, Tensor] = {}

    def __call__(self, model, samples: list[Sample]) -> list[Tensor]:
        missing = list({s.id: s for s in samples if s.id not in self.scores}.values())
        if missing:
            inputs, token_filter = teacher_forced_inputs(model, missing, self.task, self.frame)
            result = integrated_gradients(model, inputs, self.baseline, steps=self.steps, token_filter=token_filter,
                                          reduce=self.reduce, target=self.target)  # fmt: skip
            self.scores.update({s.id: result.of_image(i) for i, s in enumerate(missing)})
        return [self.scores[s.id] for s in samples]


def _check_ig(steps: int, baseline: str, rank: str, reduce: str, target: str, task: str | None) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ig_steps must be a positive int, got {steps!r}")
    if baseline not in ("mean", "zero"):
        raise ValueError(f"unknown IG baseline {baseline!r}; expected 'mean' or 'zero'")
    if rank not in ("signed", "abs"):
        raise ValueError(f"unknown IG ranking {rank!r}; expected 'signed' or 'abs'")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown IG reduction {reduce!r}; expected one of {REDUCTIONS}")
    if target not in TARGETS:
        raise ValueError(f"unknown IG target {target!r}; expected one of {TARGETS}")
    if target == "first_logit" and task == "localization":
        raise ValueError("ig_target='first_logit' is the class logit of the list task; localization attributes the box's digits")


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [fractions] if isinstance(fractions, (int, float)) else list(fractions)
    if not fractions:
        raise ValueError("fractions is empty: give at least one share of image tokens in (0, 1]")
    for fraction in fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"a fraction is a share of image tokens in (0, 1] (0.08 = 8%), got {fraction!r}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions repeats a value: {fractions}")
    return [float(f) for f in fractions]


def _resolve_mean(
    model, dataset, fill, mean, needed: bool, chosen: dict, batch_size: int, progress: bool
) -> iv.MeanEmbedding | Tensor | None:
    if isinstance(fill, iv.MeanEmbedding):
        if mean is not None and mean is not fill:
            raise ValueError("two means given: pass the MeanEmbedding as fill= or as mean=, not both")
        return fill
    if isinstance(mean, (str, Path)):
        return iv.load_mean(mean, model)
    if isinstance(mean, Tensor):
        if tuple(mean.shape) != (model.cfg.text.d_model,):
            raise ValueError(f"mean has shape {tuple(mean.shape)}; a mean visual embedding is [d_model] = [{model.cfg.text.d_model}]")
        return mean
    if mean is not None and not isinstance(mean, iv.MeanEmbedding):
        raise TypeError(f"mean must be a MeanEmbedding, a [d_model] tensor, a save_mean file or None, got a {type(mean).__name__}")
    if mean is not None or not needed:
        return mean
    seen: set[str] = set()
    images = _distinct_images(chosen_samples(dataset, **chosen), seen)
    first = next(images, None)
    if first is None:
        raise empty_dataset_error()
    warnings.warn(
        "mean=None: computing the mean visual embedding over this dataset's images; the paper averages "
        "ImageNet-val (compute it once with compute_mean_embedding, save_mean, and pass mean=)",
        stacklevel=3,
    )
    mean = iv.compute_mean_embedding(model, chain([first], images), batch_size=batch_size, progress=progress)
    if progress:
        print(f"mean visual embedding: {mean.count} image tokens of {len(seen)} distinct images of the dataset")
    return mean


def _distinct_images(samples, seen: set[str]) -> Iterator:
    """Each image once, though several of its objects are samples (an image with k queried
    objects would otherwise weigh k times in the mean; PROTOCOL-AUDIT A8); `seen` collects them."""
    for sample in samples:
        if sample.image_key not in seen:
            seen.add(sample.image_key)
            yield sample.image
