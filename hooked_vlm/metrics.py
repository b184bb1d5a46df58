"""Teacher-forced answer metrics and the mediation fraction (PAPER_PROTOCOL §1.9).

`masked_nll` scores chosen answer tokens (`VLMInput.answer_mask` from `prepare(..., answers=...)`)
under teacher forcing: the logits at position t predict the token at t + 1. A token filter keeps
only some of them — `digit_tokens` keeps a box's coordinate digits and masks out its template
(brackets, commas, tags, end of turn), as the paper does; `significant_digit_tokens` also masks
the integer zero of each decimal fraction (LLaVA's "0" of "0.61"). `masked_perplexity` is its
exponential.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooked_vlm.inputs import VLMInput

TokenFilter = Callable[[Any, Int[Tensor, "batch pos"]], Bool[Tensor, "batch pos"]]  # (tokenizer, ids) -> keep


def digit_tokens(tokenizer: Any, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Tokens whose text holds a digit: the coordinates of a box, without its template.

    The real checkpoints' tokenizers (Llama, Qwen) split numbers into single digits, so these are
    exactly the digit tokens; a tokenizer that merges a digit with punctuation ("2,") keeps the
    merged token, so that no coordinate digit goes unscored.
    """
    ids = input_ids.cpu()
    in_vocab = ids >= 0  # original LLaVA's image placeholder (-200) is no token: never a digit
    digits = [i for i in ids[in_vocab].unique().tolist() if any(ch in "0123456789" for ch in tokenizer.decode([i]))]
    lookup = torch.zeros(int(ids.max().clamp(min=0)) + 1, dtype=torch.bool)
    lookup[digits] = True
    return (in_vocab & lookup[ids.clamp(min=0)]).to(input_ids.device)


# The integer zero of a decimal fraction: the "0" of "0.61", not of "10.5", "0" or "1.05".
_INTEGER_ZERO = re.compile(r"(?<![\d.])0(?=\.\d)")


def significant_digit_tokens(tokenizer: Any, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """`digit_tokens` without the integer zero of a decimal fraction (PROTOCOL-AUDIT B5).

    LLaVA writes every coordinate as a fraction in [0, 1], `[0.61, 0.36, 0.92, 0.83]`, so the
    "0" before each "." is all but certain, and with the digit filter a third of the scored
    tokens (`0 6 1 0 3 6 0 9 2 0 8 3`) are near-zero NLLs that shrink the mean; here the same box
    scores `6 1 3 6 9 2 8 3`. The "." is no digit and is masked by both filters. The "1" of
    "1.0" is kept: it is the model's choice that the box reaches the edge. InternVL's integers
    have no integer zero (a lone "0" is a whole coordinate and is kept), so for them this equals
    `digit_tokens`; an InternVL answer written as [0, 1] floats loses its zeros like LLaVA's. A
    token that merges the zero with a scored digit ("0.6") is kept, as in `digit_tokens`.
    """
    keep = digit_tokens(tokenizer, input_ids).cpu()
    ids = input_ids.cpu()
    # raw token strings keep the word-boundary marks ("▁", "Ġ") that decoding one token drops,
    # so the digits of two numbers never run together; original LLaVA's -200 is no token
    pieces = {i: tokenizer.convert_ids_to_tokens(i) or "" for i in ids[ids >= 0].unique().tolist()}
    for row in range(ids.shape[0]):
        texts = [pieces.get(i, " ") for i in ids[row].tolist()]
        joined = "".join(texts)
        zeros = {m.start() for m in _INTEGER_ZERO.finditer(joined)}
        if not zeros:
            continue
        start = 0
        for t, text in enumerate(texts):
            digits = [start + k for k, ch in enumerate(text) if ch.isdigit()]
            if digits and keep[row, t] and all(d in zeros for d in digits):
                keep[row, t] = False
            start += len(text)
    return keep.to(input_ids.device)


def answer_text_tokens(tokenizer: Any, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Tokens other than the special ones: a teacher-forced answer without the end-of-turn token
    the chat template appends (`</s>`, `<|im_end|>`)."""
    special = set(tokenizer.all_special_ids) | {i for i in input_ids.unique().tolist() if i >= 0 and
                                                tokenizer.convert_ids_to_tokens(i) in END_OF_TURN}  # fmt: skip
    return ~torch.isin(input_ids.cpu(), torch.tensor(sorted(special), dtype=input_ids.dtype)).to(input_ids.device)


END_OF_TURN = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
FILTERS: dict[str, TokenFilter] = {
    "digits": digit_tokens,
    "significant_digits": significant_digit_tokens,
    "answer_text": answer_text_tokens,
}


def scored_tokens(
    inputs: VLMInput, tokenizer: Any = None, token_filter: TokenFilter | str | None = None
) -> Bool[Tensor, "batch pos"]:
    """The answer tokens that are scored: `inputs.answer_mask`, narrowed by `token_filter`
    (a callable `(tokenizer, input_ids) -> mask` or the name of one in `FILTERS`)."""
    if inputs.answer_mask is None:
        raise ValueError("these inputs carry no answer: prepare them with answers=... for teacher forcing")
    mask = inputs.answer_mask.bool()
    if token_filter is None:
        return mask
    if isinstance(token_filter, str):
        if token_filter not in FILTERS:
            raise ValueError(f"unknown token filter {token_filter!r}; known: {sorted(FILTERS)}")
        token_filter = FILTERS[token_filter]
    return mask & token_filter(tokenizer, inputs.input_ids).to(mask.device)


def token_nll(logits: Float[Tensor, "batch pos d_vocab"], input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """-log p(token t | tokens < t) at every position t >= 1 (position 0 has no prediction: NaN).
    An id outside the vocabulary (original LLaVA's image placeholder, -200) has no probability: NaN."""
    # at least fp32 (half-precision logits lose digits in the log-sum-exp); fp64 logits stay fp64
    logprobs = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = input_ids[:, 1:].to(logits.device)
    in_vocab = (targets >= 0) & (targets < logits.shape[-1])
    nll = -logprobs.gather(-1, torch.where(in_vocab, targets, 0)[..., None])[..., 0]
    nll = torch.where(in_vocab, nll, float("nan"))
    return torch.cat([torch.full_like(nll[:, :1], float("nan")), nll], dim=1)


def masked_nll(
    model,
    inputs: VLMInput,
    *,
    token_filter: TokenFilter | str | None = None,
    fwd_hooks: Sequence = (),
    logits: Float[Tensor, "batch pos d_vocab"] | None = None,
) -> Float[Tensor, "batch"]:
    """Mean teacher-forced NLL of each item's scored answer tokens (see `scored_tokens`), under
    `fwd_hooks` (or of given `logits`). An item with no scored token is an error."""
    mask = scored_tokens(inputs, model.tokenizer, token_filter)
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"items {empty} have no scored answer token (answer empty, or the filter removed every token)")
    if mask[:, 0].any():
        raise ValueError("position 0 cannot be scored: nothing precedes it")
    if logits is None:
        with torch.no_grad():
            logits = model.run_with_hooks(inputs, fwd_hooks=list(fwd_hooks))
    # the mean in float64: its value must not depend on how many unscored positions surround the
    # answer (a suffix-only forward sums fewer zeros), since MF divides small differences of it
    # Unscored positions (position 0's NaN included) count 0; a NaN or inf at a scored token
    # (an overflow in half precision) propagates rather than reading as a perfect prediction.
    nll = token_nll(logits, inputs.input_ids).double()
    mask = mask.to(nll.device)
    return torch.where(mask, nll, 0.0).sum(1) / mask.sum(1)


def masked_perplexity(model, inputs: VLMInput, **kwargs: Any) -> Float[Tensor, "batch"]:
    """`exp(masked_nll)`: the paper's token-level perplexity (same arguments as `masked_nll`)."""
    return masked_nll(model, inputs, **kwargs).exp()


def mediation_fraction(
    p_base: Float[Tensor, "*batch"] | float,
    p_patched: Float[Tensor, "*batch"] | float,
    p_src: Float[Tensor, "*batch"] | float,
    *,
    min_effect: float = 0.01,
) -> Float[Tensor, "*batch"]:
    """`MF = (P_base - P_patched) / (P_base - P_src)` elementwise (§1.9): 1 when patching the
    component moves the base all the way to the source, 0 when it does nothing, < 0 when it
    moves it the other way.

    Guard: where the source and base barely differ, `|P_base - P_src| <= min_effect * |P_base|`,
    there is no effect to mediate and the ratio would explode; MF is NaN there, so that
    `torch.nanmean` over pairs drops those pairs (PAPER_PROTOCOL §2.7). `min_effect=0` guards only
    an exactly zero denominator.
    """
    p_base, p_patched, p_src = (torch.as_tensor(p, dtype=torch.float64) for p in (p_base, p_patched, p_src))
    denominator = p_base - p_src
    degenerate = denominator.abs() <= min_effect * p_base.abs()
    mf = (p_base - p_patched) / torch.where(degenerate, torch.ones_like(denominator), denominator)
    return torch.where(degenerate, torch.full_like(mf, float("nan")), mf)
