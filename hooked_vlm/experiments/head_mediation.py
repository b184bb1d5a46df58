"""`head_mediation`: causal mediation over language-model heads (PAPER_PROTOCOL §1.9).

For each source/base pair (source = the image with the object, base = the object removed; same
size, so the token layouts match), the source's activation of one head (`hook_z`, the head's
slice before `o_proj`) is written into the base run at the chosen positions, and the
teacher-forced perplexity P of the target answer is measured:

    MF = (P_base - P_patched) / (P_base - P_src)

MF ~ 1: the head carries the object's effect; ~ 0: it does not; < 0: patching it interferes.

MF is NaN where nothing is measured: on a pair whose source and base barely differ
(`mediation_fraction`'s guard), and for a head whose patch cannot reach a scored token. A head's
output at position p enters the residual stream at p; a later layer's attention carries it to
every position from p on, but from the last layer it reaches only p's own logits, which predict
token p + 1. So with positions="prompt" for localization (the scored digits come after the
answer's template opening, "[" or "<ref>") every last-layer head is unreachable: its MF would be
0 by construction, not by measurement, and would rank it "unimportant". Those heads get MF NaN
and `p_patched = p_base` (what the patch leaves unchanged; the exact sweep skips them). For
binary, the scored "Yes" is predicted from the last prompt position, so the last layer is
measured; with "answer" or "prompt+answer" every layer reaches the answer's logits.

`method="exact"` runs every patched forward (all heads of a pair in a few batched passes over the
shared prefix, `hooked_vlm.patching.head_patching_sweep`); `method="attribution"` estimates every
head's patched NLL to first order from one forward/backward (`head_attribution`).

Pairs: the protocol's 50 (§1.9) by default, a seeded random subset (`limit`, `sample`,
`sample_seed`; COCO's file is ordered by class, so its first 50 would be one or two classes).

Output columns: `pair_id`, `class_name`, `layer`, `head`, `mf` (NaN: not measured, see above),
`p_base`, `p_src`, `p_patched` (the perplexities P above), `method`, `task`, `positions`,
`target` (the answer text scored), `target_source` ("src_greedy" or "gt": the source's greedy
answer is used when it is correct, else the ground truth), `excluded` (None, or why the pair was
not measured — its object lies outside what the model sees, e.g. LLaVA's centre crop: one row,
no head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vlm.data.prompts import YES, binary_prompt, localization_answer, localization_prompt
from hooked_vlm.experiments.data import Sample, SampleMode, sample_sources
from hooked_vlm.boxes import FloatBoxes, Frame
from hooked_vlm.experiments.evaluate import box_format, exclusion
from hooked_vlm.inputs import VLMInput
from hooked_vlm.metrics import mediation_fraction, scored_tokens
from hooked_vlm.patching import answer_nll_metric, head_attribution, head_patching_sweep
from hooked_vlm.runs import Item, Run, Work, execute
from hooked_vlm.scoring import binary_answer, score_localization_answer

Task = Literal["localization", "binary"]
Positions = Literal["prompt", "answer", "prompt+answer"]
# Which of a box's tokens the localization score reads (`metrics.FILTERS`): "digits", every
# coordinate digit (the paper masks brackets, commas etc.; the default), or "significant_digits",
# without the integer "0" of LLaVA's fractions (PROTOCOL-AUDIT B5).
TokenFilter = Literal["digits", "significant_digits"]
TOKEN_FILTERS: tuple[str, ...] = ("digits", "significant_digits")


def head_mediation(
    model,
    pairs: Any,
    *,
    task: Task = "localization",
    positions: Positions = "prompt",
    target: Literal["src_greedy", "gt"] = "src_greedy",
    method: Literal["exact", "attribution"] = "exact",
    batch_size: int = 16,
    max_new_tokens: int = 40,
    frame: Frame | None = None,
    float_boxes: FloatBoxes = "official",
    token_filter: TokenFilter = "digits",
    min_effect: float = 0.01,
    limit: int | None = 50,
    sample: SampleMode = "random",
    sample_seed: int = 0,
    progress: bool = True,
    run: Run | str | Path | None = None,
) -> pd.DataFrame:
    """Mediation fraction of every language-model head on every pair (see the module docstring).

    `pairs`: anything `as_samples` reads whose samples carry `removed_image` (the synthetic set,
    or COCO object-removed pairs). Scored tokens: the box's coordinate digits for localization
    (template tokens masked out, as the paper does), the first answer token ("Yes") for binary.
    `token_filter` (localization): "digits" scores every digit of the box, LLaVA's leading "0"
    of each fraction included (the paper masks only "brackets, commas, etc.", and Liu et al.
    score "numeric coordinate tokens"); "significant_digits" leaves out that near-certain zero,
    which otherwise is a third of LLaVA's scored tokens (`metrics.significant_digit_tokens`;
    InternVL's integer boxes score the same under both).
    `positions`: "prompt" patches the text after the image up to the answer (the paper's
    setting), "answer" the teacher-forced answer tokens, or both. Pairs whose source and base
    perplexities differ by less than `min_effect` (relative) get NaN (see `mediation_fraction`),
    and so do heads whose patch cannot reach a scored token (the last layer's with "prompt" for
    localization; see the module docstring). A choice of positions no head can reach (binary
    with "answer": its one scored token is predicted before the answer) is an error.
    `frame`: the box frame of the localization target and of scoring the source's greedy answer
    (None: `default_frame(model)`, as in `evaluate`), and `float_boxes` how an InternVL greedy
    answer written as [0, 1] floats is read (`evaluate`'s); `max_new_tokens` bounds that answer.
    `limit`, `sample`, `sample_seed`: which pairs (default: 50 drawn at random with seed 0, the
    protocol's count; `limit=None` takes every pair). A pair whose object the model cannot see
    gets one row with `excluded` set, rather than stopping the run.
    `run`: a run directory to record the rows in and resume from (`hooked_vlm.runs`; one item per
    pair, its rows for every head).
    """
    if task not in ("localization", "binary"):
        raise ValueError(f"head mediation supports task 'localization' or 'binary', got {task!r}")
    if method not in ("exact", "attribution"):
        raise ValueError(f"unknown method {method!r} (expected 'exact' or 'attribution')")
    if positions not in ("prompt", "answer", "prompt+answer"):
        raise ValueError(f"unknown positions {positions!r} (expected 'prompt', 'answer' or 'prompt+answer')")
    if target not in ("src_greedy", "gt"):
        raise ValueError(f"unknown target {target!r} (expected 'src_greedy' or 'gt')")
    if token_filter not in TOKEN_FILTERS:
        raise ValueError(f"unknown token_filter {token_filter!r}; expected one of {TOKEN_FILTERS}")
    boxes = box_format(model, frame, float_boxes)
    chosen = sample_sources(pairs, limit, sample=sample, sample_seed=sample_seed)
    items = [Item(pair_id, pair_id, load) for pair_id, load in chosen]

    def compute(pending: list[Item]) -> Iterator[tuple[str, list[dict]]]:
        for item in pending:
            yield item.key, _pair_rows(model, item.payload(), task, positions, target, method, batch_size, max_new_tokens,
                                       boxes, token_filter, min_effect)  # fmt: skip

    settings = {"task": task, "positions": positions, "target": target, "method": method, "max_new_tokens": max_new_tokens,
                "box_format": boxes, "token_filter": token_filter, "min_effect": min_effect, "limit": limit, "sample": sample,
                "sample_seed": sample_seed, "data": chosen.data}  # fmt: skip
    work = Work("head_mediation", items, compute, _table, settings=settings, model=model, desc=f"head mediation ({method})", unit="pair")
    return execute(work, run, progress=progress)


def _pair_rows(
    model, sample: Sample, task: Task, positions: Positions, target: str, method: str, batch_size: int, max_new_tokens: int,
    boxes: dict[str, Any], token_filter: TokenFilter, min_effect: float,
) -> list[dict]:
    """One row per head: the mediation fractions of one source/base pair (`boxes`: `box_format`)."""
    prompt = pair_prompt(sample, task)
    reason = exclusion(sample, boxes)
    if reason:  # no answer to score in the model's frame: recorded, the run goes on
        return [{"pair_id": sample.id, "class_name": sample.class_name, "layer": None, "head": None, "mf": float("nan"),
                 "method": method, "task": task, "positions": positions, "excluded": reason}]  # fmt: skip
    answer, answer_source = _target_answer(model, sample, task, prompt, target, max_new_tokens, boxes)
    source = model.prepare(sample.image, prompt, answers=answer)
    base = model.prepare(sample.removed_image, prompt, answers=answer)
    mask = _scored_mask(model, base, task, token_filter)
    patched_positions = _positions(base, positions)
    unreached = unreachable_layers(model.cfg.n_layers, patched_positions, mask)
    if unreached.all():
        raise ValueError(f"with positions={positions!r} no head's patch reaches a scored token of the answer {answer!r}")
    nll_base, nll_src = (_nll(model, inputs, mask) for inputs in (base, source))
    metric = answer_nll_metric(base, token_mask=mask)
    if method == "exact":
        heads = [(layer, head) for layer in torch.nonzero(~unreached).flatten().tolist() for head in range(model.cfg.n_heads)]
        nll_patched = head_patching_sweep(model, base, source, metric, patched_positions, heads=heads, batch_size=batch_size)
    else:
        scores = head_attribution(model, base, source, metric, patched_positions, towers=("language",))
        nll_patched = nll_base + scores["language"].double()
    nll_patched[unreached] = nll_base.double()  # the patch cannot change the score
    p_base, p_src, p_patched = nll_base.exp(), nll_src.exp(), nll_patched.exp()
    mf = mediation_fraction(p_base, p_patched, p_src, min_effect=min_effect)
    mf[unreached] = float("nan")  # not measured: 0 by construction says nothing about the head
    return [
        {"pair_id": sample.id, "class_name": sample.class_name, "layer": layer, "head": head,
         "mf": float(mf[layer, head]), "p_base": float(p_base), "p_src": float(p_src),
         "p_patched": float(p_patched[layer, head]), "method": method, "task": task,
         "positions": positions, "target": answer, "target_source": answer_source, "excluded": None}
        for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)
    ]  # fmt: skip


def _table(rows_per_item: list[list[dict]]) -> pd.DataFrame:
    table = pd.DataFrame([row for rows in rows_per_item for row in rows])
    return table.astype({"layer": "Int64", "head": "Int64"})  # an excluded pair's row has no head


AGGREGATES = ("mean", "median", "ratio_of_sums")


def mediation_map(results: pd.DataFrame, aggregate: str = "mean") -> Float[Tensor, "layer head"]:
    """MF per head over the pairs where it was measured (NaN rows skipped): the paper's layer x
    head heat-map. A head NaN in every pair (e.g. the last layer's with positions="prompt")
    stays NaN: not measured, which is not MF 0.

    `aggregate`: "mean" (the paper's), or robustness checks against the few pairs just above the
    `min_effect` guard whose |MF| is huge (PROTOCOL-AUDIT B6): "median", and "ratio_of_sums",
    sum(P_base - P_patched) / sum(P_base - P_src) over the measured pairs (each pair weighs by
    its effect)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATES}")
    measured = results[results["mf"].notna()]
    heads = results[results["layer"].notna()].groupby(["layer", "head"])["mf"]  # every head, measured or not
    if aggregate == "ratio_of_sums":
        effect = (measured["p_base"] - measured["p_patched"]).groupby([measured["layer"], measured["head"]]).sum()
        total = (measured["p_base"] - measured["p_src"]).groupby([measured["layer"], measured["head"]]).sum()
        values = (effect / total).reindex(heads.size().index)
    else:
        values = getattr(heads, aggregate)()  # pandas skips NaN
    return torch.tensor(values.unstack("head").to_numpy(dtype=float), dtype=torch.float32)


def mediation_counts(results: pd.DataFrame) -> dict[str, int]:
    """How many pairs the map rests on: `pairs` in the table, `excluded` (not measured, see the
    `excluded` column), `dropped` (measured, but every head NaN: source and base barely differ,
    `min_effect`) and `measured`."""
    excluded = results.groupby("pair_id")["excluded"].agg(lambda v: v.notna().any()) if "excluded" in results else None
    measured = results.groupby("pair_id")["mf"].agg(lambda v: v.notna().any())
    n_excluded = int(excluded.sum()) if excluded is not None else 0
    n_measured = int(measured.sum())
    return {"pairs": len(measured), "excluded": n_excluded, "dropped": len(measured) - n_excluded - n_measured,
            "measured": n_measured}  # fmt: skip


def rank_heads(values: Float[Tensor, "layer head"], k: int | None = None, *, by: Literal["top", "least_abs"] = "top") -> list[tuple[int, int]]:
    """Measured heads ordered by value, largest first ("top": the paper ranks by mean MF, so
    strongly negative heads are not critical), or by |value|, smallest first ("least_abs": the
    low-importance control of the cumulative ablation). NaN heads (not measured) are left out,
    so they are never ranked top nor least important, and the list may be shorter than the
    number of heads; `k` keeps the first k."""
    if by not in ("top", "least_abs"):
        raise ValueError(f"unknown ranking {by!r} (expected 'top' or 'least_abs')")
    values = torch.as_tensor(values, dtype=torch.float64)
    key = (values if by == "top" else -values.abs()).flatten()
    order = torch.argsort(key, descending=True, stable=True)
    n_heads = values.shape[1]
    ranked = [(int(i) // n_heads, int(i) % n_heads) for i in order if not torch.isnan(key[i])]
    return ranked if k is None else ranked[:k]


def unreachable_layers(n_layers: int, positions: Tensor, scored: Bool[Tensor, "1 pos"]) -> Bool[Tensor, "layer"]:
    """Layers whose heads, patched at `positions`, cannot change any `scored` token's NLL.

    Token t is scored from the logits at t - 1. A head's output at p reaches, through the
    attention of any later layer, every position from p on; from the last layer only p itself.
    So a layer before the last is unreachable only if every scored token is predicted before
    the first patched position, and the last layer also if no patched position predicts one."""
    predicted_at = torch.nonzero(scored[0]).flatten() - 1
    positions = torch.as_tensor(positions).flatten()
    unreached = torch.full((n_layers,), bool((predicted_at < int(positions.min())).all()))
    unreached[-1] = not bool(torch.isin(predicted_at, positions).any())
    return unreached


def pair_prompt(sample: Sample, task: Task) -> str:
    """The prompt of an object-removed pair, once its twin is checked (present, same size)."""
    if sample.removed_image is None:
        raise ValueError(f"sample {sample.id} has no object-removed image: mediation needs source/base pairs")
    if sample.removed_image.size != sample.image.size:
        raise ValueError(f"sample {sample.id}: the removed image is {sample.removed_image.size}, the source {sample.image.size}")
    return localization_prompt(sample.class_name) if task == "localization" else binary_prompt(sample.class_name)


def _target_answer(
    model, sample: Sample, task: Task, prompt: str, target: str, max_new_tokens: int, boxes: dict[str, Any]
) -> tuple[str, str]:
    """The answer sequence to score: the source's greedy answer when it is correct (the
    protocol's recommendation), else (or with target="gt") the ground truth in the model's format."""

    def truth() -> str:  # only when it is scored: the greedy answer needs no ground-truth answer
        return localization_answer(sample.box, sample.image_size, sample.class_name, **boxes) if task == "localization" else YES

    if target == "gt":
        return truth(), "gt"
    if target != "src_greedy":
        raise ValueError(f"unknown target {target!r} (expected 'src_greedy' or 'gt')")
    inputs = model.prepare(sample.image, prompt)
    tokens = model.generate(inputs, max_new_tokens=max_new_tokens, return_tokens=True)[0].tolist()
    eos = set(model.cfg.eos_token_ids)
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    text = model.tokenizer.decode(tokens, skip_special_tokens=False).strip()
    if task == "localization":
        correct = score_localization_answer(text, sample.box, sample.image_size, **boxes)["hit@0.5"]
    else:
        correct = binary_answer(text) is True
    return (text, "src_greedy") if correct and text else (truth(), "gt")


def _scored_mask(model, inputs: VLMInput, task: Task, token_filter: TokenFilter = "digits") -> Tensor:
    if task == "localization":
        mask = scored_tokens(inputs, model.tokenizer, token_filter)
    else:  # the one decisive token of the binary answer
        answer = inputs.answer_mask
        mask = answer & (answer.cumsum(-1) == 1)
    if not mask.any():
        raise ValueError(f"the target answer {inputs.text!r} has no token to score")
    return mask


def _positions(inputs: VLMInput, which: Positions) -> Tensor:
    """Post-image prompt positions (up to the token that predicts the answer) and/or the answer's."""
    after_image = int(inputs.layout.position.max()) + 1
    answer = torch.nonzero(inputs.answer_mask[0]).flatten()
    prompt = torch.arange(after_image, int(answer[0]))
    if which == "prompt":
        return prompt
    answer_positions = answer[:-1]  # the last answer token predicts nothing that is scored
    return answer_positions if which == "answer" else torch.cat([prompt, answer_positions])


@torch.no_grad()
def _nll(model, inputs: VLMInput, mask: Tensor) -> Tensor:
    logits = model(inputs)
    return answer_nll_metric(inputs, token_mask=mask)(logits, 0)[0]
