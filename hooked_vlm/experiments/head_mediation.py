"""`head_mediation`: causal mediation over language-model heads (PAPER_PROTOCOL §1.9).

For each source/base pair (source = the image with the object, base = the object removed; same
size, so the token layouts match), the source's activation of one head (`hook_z`, the head's
slice before `o_proj`) is written into the base run at the chosen positions, and the
teacher-forced perplexity P of the target answer is measured:

    MF = (P_base - P_patched) / (P_base - P_src)

MF ~ 1: the head carries the object's effect; ~ 0: it does not; < 0: patching it interferes.
`method="exact"` runs every patched forward (all heads of a pair in a few batched passes over the
shared prefix, `hooked_vlm.patching.head_patching_sweep`); `method="attribution"` estimates every
head's patched NLL to first order from one forward/backward (`head_attribution`).

Output columns: `pair_id`, `class_name`, `layer`, `head`, `mf`, `p_base`, `p_src`, `p_patched`
(the perplexities P above), `method`, `task`, `positions`, `target` (the answer text scored),
`target_source` ("src_greedy" or "gt": the source's greedy answer is used when it is correct,
else the ground truth).
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.data.prompts import YES, binary_prompt, localization_answer, localization_prompt
from hooked_vlm.experiments.data import Sample, as_samples, empty_dataset_error
from hooked_vlm.boxes import Frame
from hooked_vlm.experiments.evaluate import box_format
from hooked_vlm.inputs import VLMInput
from hooked_vlm.metrics import mediation_fraction, scored_tokens
from hooked_vlm.patching import answer_nll_metric, head_attribution, head_patching_sweep
from hooked_vlm.scoring import binary_answer, score_localization_answer

Task = Literal["localization", "binary"]
Positions = Literal["prompt", "answer", "prompt+answer"]


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
    min_effect: float = 0.01,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Mediation fraction of every language-model head on every pair (see the module docstring).

    `pairs`: anything `as_samples` reads whose samples carry `removed_image` (the synthetic set,
    or COCO object-removed pairs). Scored tokens: the box's coordinate digits for localization
    (template tokens masked out, as the paper does), the first answer token ("Yes") for binary.
    `positions`: "prompt" patches the text after the image up to the answer (the paper's
    setting), "answer" the teacher-forced answer tokens, or both. Pairs whose source and base
    perplexities differ by less than `min_effect` (relative) get NaN (see `mediation_fraction`).
    `frame`: the box frame of the localization target and of scoring the source's greedy answer
    (None: `default_frame(model)`, as in `evaluate`); `max_new_tokens` bounds that greedy answer.
    """
    if task not in ("localization", "binary"):
        raise ValueError(f"head mediation supports task 'localization' or 'binary', got {task!r}")
    if method not in ("exact", "attribution"):
        raise ValueError(f"unknown method {method!r} (expected 'exact' or 'attribution')")
    if positions not in ("prompt", "answer", "prompt+answer"):
        raise ValueError(f"unknown positions {positions!r} (expected 'prompt', 'answer' or 'prompt+answer')")
    rows = []
    samples = list(itertools.islice(as_samples(pairs), limit))
    if not samples:
        raise empty_dataset_error()
    for sample in tqdm(samples, desc=f"head mediation ({method})", disable=not progress):
        if sample.removed_image is None:
            raise ValueError(f"sample {sample.id} has no object-removed image: mediation needs source/base pairs")
        if sample.removed_image.size != sample.image.size:
            raise ValueError(f"sample {sample.id}: the removed image is {sample.removed_image.size}, the source {sample.image.size}")
        prompt = localization_prompt(sample.class_name) if task == "localization" else binary_prompt(sample.class_name)
        answer, answer_source = _target_answer(model, sample, task, prompt, target, max_new_tokens, frame)
        source = model.prepare(sample.image, prompt, answers=answer)
        base = model.prepare(sample.removed_image, prompt, answers=answer)
        mask = _scored_mask(model, base, task)
        patched_positions = _positions(base, positions)
        nll_base, nll_src = (_nll(model, inputs, mask) for inputs in (base, source))
        metric = answer_nll_metric(base, token_mask=mask)
        if method == "exact":
            nll_patched = head_patching_sweep(model, base, source, metric, patched_positions, batch_size=batch_size)
        else:
            scores = head_attribution(model, base, source, metric, patched_positions, towers=("language",))
            nll_patched = nll_base + scores["language"]
        p_base, p_src, p_patched = nll_base.exp(), nll_src.exp(), nll_patched.exp()
        mf = mediation_fraction(p_base, p_patched, p_src, min_effect=min_effect)
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                rows.append(
                    {"pair_id": sample.id, "class_name": sample.class_name, "layer": layer, "head": head,
                     "mf": float(mf[layer, head]), "p_base": float(p_base), "p_src": float(p_src),
                     "p_patched": float(p_patched[layer, head]), "method": method, "task": task,
                     "positions": positions, "target": answer, "target_source": answer_source}
                )  # fmt: skip
    return pd.DataFrame(rows)


def mediation_map(results: pd.DataFrame) -> Float[Tensor, "layer head"]:
    """Mean MF per head over pairs (NaN pairs dropped): the paper's layer x head heat-map."""
    table = results.groupby(["layer", "head"])["mf"].mean().unstack("head")
    return torch.tensor(table.to_numpy(), dtype=torch.float32)


def rank_heads(values: Float[Tensor, "layer head"], k: int | None = None, *, by: Literal["top", "least_abs"] = "top") -> list[tuple[int, int]]:
    """Heads ordered by value, largest first ("top": the paper ranks by mean MF, so strongly
    negative heads are not critical), or by |value|, smallest first ("least_abs": the
    low-importance control of the cumulative ablation). NaN heads come last; `k` keeps the first k."""
    values = torch.as_tensor(values, dtype=torch.float64)
    key = values if by == "top" else -values.abs()
    if by not in ("top", "least_abs"):
        raise ValueError(f"unknown ranking {by!r} (expected 'top' or 'least_abs')")
    key = torch.where(torch.isnan(key), torch.tensor(-torch.inf, dtype=key.dtype), key)
    order = torch.argsort(key.flatten(), descending=True, stable=True)
    n_heads = values.shape[1]
    ranked = [(int(i) // n_heads, int(i) % n_heads) for i in order]
    return ranked if k is None else ranked[:k]


def _target_answer(
    model, sample: Sample, task: Task, prompt: str, target: str, max_new_tokens: int, frame: Frame | None
) -> tuple[str, str]:
    """The answer sequence to score: the source's greedy answer when it is correct (the
    protocol's recommendation), else (or with target="gt") the ground truth in the model's format."""
    boxes = box_format(model, frame)
    truth = (
        localization_answer(sample.box, sample.image_size, sample.class_name, **boxes)
        if task == "localization"
        else YES
    )
    if target == "gt":
        return truth, "gt"
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
    return (text, "src_greedy") if correct and text else (truth, "gt")


def _scored_mask(model, inputs: VLMInput, task: Task) -> Tensor:
    if task == "localization":
        mask = scored_tokens(inputs, model.tokenizer, "digits")
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
