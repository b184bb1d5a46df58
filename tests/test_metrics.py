"""Teacher-forced masked NLL equals a hand computation from the logits; the digit filter keeps
exactly a box's digits, the significant-digit filter those without LLaVA's leading zeros; the
mediation fraction and its guard."""

from __future__ import annotations

import math
import re

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.boxes import format_box
from hooked_vlm.metrics import digit_tokens, masked_nll, masked_perplexity, mediation_fraction, scored_tokens

CHECKPOINTS = ["llava_base", "internvl_6b"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def setup(request, tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    images = [photos["rocket"], photos["chelsea"]]
    family = model.cfg.family
    answers = [format_box((40, 30, 200, 180), image.size, family=family, label="thing" if family == "internvl" else None) for image in images]
    inputs = model.prepare(images, ["Where is the rocket?", "Where is the cat? Answer with a box."], answers=answers)
    return model, inputs, answers


def test_digit_filter_keeps_exactly_the_digits_of_a_formatted_box(setup):
    model, inputs, answers = setup
    kept = scored_tokens(inputs, model.tokenizer, "digits")
    tok = model.tokenizer
    for row, answer in enumerate(answers):
        texts = [tok.decode([int(i)]) for i in inputs.input_ids[row, kept[row]]]
        dropped = [tok.decode([int(i)]) for i in inputs.input_ids[row, inputs.answer_mask[row] & ~kept[row]]]
        assert re.sub(r"\D", "", "".join(texts)) == re.sub(r"\D", "", answer)  # every coordinate digit, in order
        assert all(re.search(r"\d", t) for t in texts) and not any(re.search(r"\d", t) for t in dropped)
        assert dropped  # brackets, commas, tags, end of turn
    plain = torch.tensor([[tok.convert_tokens_to_ids(t) for t in tok.tokenize("7")]])
    assert digit_tokens(tok, plain).all()


def test_significant_digit_filter_keeps_the_digits_after_each_integer_zero(setup):
    """On the tiny checkpoints' own tokenizers: LLaVA's box loses the "0" of each "0.xx",
    InternVL's integer box keeps every digit."""
    model, inputs, answers = setup
    kept = scored_tokens(inputs, model.tokenizer, "significant_digits")
    for row, answer in enumerate(answers):
        texts = [model.tokenizer.decode([int(i)]) for i in inputs.input_ids[row, kept[row]]]
        assert re.sub(r"\D", "", "".join(texts)) == re.sub(r"\D", "", re.sub(r"(?<![\d.])0(?=\.)", "", answer))


@pytest.mark.parametrize("token_filter", [None, "digits"])
def test_masked_nll_equals_a_hand_computation(setup, token_filter):
    model, inputs, _ = setup
    with torch.no_grad():
        logits = model(inputs)
    keep = inputs.answer_mask if token_filter is None else scored_tokens(inputs, model.tokenizer, token_filter)
    expected = []
    for row in range(len(inputs)):
        total, n = 0.0, 0
        for t in keep[row].nonzero().flatten().tolist():
            logprobs = logits[row, t - 1].double().log_softmax(-1)  # logits at t-1 predict token t
            total -= logprobs[inputs.input_ids[row, t]].item()
            n += 1
        expected.append(total / n)
    ours = masked_nll(model, inputs, token_filter=token_filter)
    assert torch.allclose(ours.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(masked_perplexity(model, inputs, token_filter=token_filter), ours.exp())



@pytest.mark.parametrize("token_filter", [None, "digits"])
def test_masked_nll_reads_an_original_llava_checkpoint_whose_image_placeholder_is_no_token(tiny_checkpoint, photos, token_filter):
    """Original LLaVA-1.5 keeps its image placeholder, -200, in `input_ids`: it lies outside the
    vocabulary, so it is never a digit and never a target."""
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    image = photos["chelsea"]
    inputs = model.prepare(image, "Where is the cat?", answers=format_box((40, 30, 200, 180), image.size, family="llava"))
    assert int(inputs.input_ids.min()) == -200
    with torch.no_grad():
        logits = model(inputs)
    keep = scored_tokens(inputs, model.tokenizer, token_filter)
    scored = keep[0].nonzero().flatten().tolist()
    assert scored and not (keep & inputs.image_token_mask()).any()
    expected = sum(-logits[0, t - 1].double().log_softmax(-1)[inputs.input_ids[0, t]].item() for t in scored) / len(scored)
    assert masked_nll(model, inputs, token_filter=token_filter).item() == pytest.approx(expected, abs=1e-5)

def test_a_nan_logit_at_a_scored_token_propagates_and_one_elsewhere_does_not(setup):
    """An overflow (NaN logits) where a scored token is predicted must not read as NLL 0."""
    from hooked_vlm.patching import answer_nll_metric

    model, inputs, _ = setup
    with torch.no_grad():
        logits = model(inputs)
    scored = scored_tokens(inputs, model.tokenizer, "digits")
    t = int(scored[0].nonzero()[0])
    at_scored, elsewhere = logits.clone(), logits.clone()
    at_scored[0, t - 1] = float("nan")
    elsewhere[0, 0] = float("nan")  # predicts position 1, never scored
    clean = masked_nll(model, inputs, token_filter="digits", logits=logits)
    broken = masked_nll(model, inputs, token_filter="digits", logits=at_scored)
    assert torch.isnan(broken[0]) and torch.equal(broken[1], clean[1])
    assert torch.equal(masked_nll(model, inputs, token_filter="digits", logits=elsewhere), clean)
    metric = answer_nll_metric(inputs, token_mask=scored)
    assert torch.isnan(metric(at_scored, 0)[0]) and torch.allclose(metric(logits, 0), clean)


def test_masked_nll_runs_under_hooks(setup):
    model, inputs, _ = setup
    hooks = iv.token_ablation(model, iv.image_tokens(inputs), "zero")
    with torch.no_grad():
        logits = model.run_with_hooks(inputs, fwd_hooks=hooks)
    assert torch.equal(masked_nll(model, inputs, fwd_hooks=hooks), masked_nll(model, inputs, logits=logits))
    assert not torch.equal(masked_nll(model, inputs, fwd_hooks=hooks), masked_nll(model, inputs))


def test_masked_nll_needs_answers(setup, photos):
    model, _, _ = setup
    with pytest.raises(ValueError, match="answers="):
        masked_nll(model, model.prepare(photos["rocket"], "Hi"))
    no_digits = model.prepare(photos["rocket"], "Hi", answers="yes")
    with pytest.raises(ValueError, match=r"items \[0\] have no scored answer token"):
        masked_nll(model, no_digits, token_filter="digits")
    with pytest.raises(ValueError, match="unknown token filter"):
        masked_nll(model, no_digits, token_filter="numbers")


def test_mediation_fraction():
    p_base = torch.tensor([4.0, 4.0, 4.0, 2.0])
    p_patched = torch.tensor([4.0, 1.0, 5.0, 1.0])
    p_src = torch.tensor([1.0, 1.0, 1.0, 2.0])
    mf = mediation_fraction(p_base, p_patched, p_src)
    assert mf[:3].tolist() == [0.0, 1.0, -1 / 3]
    assert math.isnan(mf[3])  # p_base == p_src: nothing to mediate
    assert math.isnan(mediation_fraction(10.0, 9.0, 9.95))  # within 1% of p_base
    assert mediation_fraction(10.0, 9.0, 9.95, min_effect=0.0).item() == pytest.approx(20.0)
