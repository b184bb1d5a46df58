"""LLaVA-1.5: the hooked model is numerically the Hugging Face model.

Every comparison goes through `hooked_vlm.check_parity`, the tool users run on real checkpoints,
on three tiny random configurations (different widths, head counts, image sizes, feature layers,
a list of feature layers, the "full" strategy) with real photos, batch of 2 with left padding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from hooked_vlm import HookedVLM
from hooked_vlm.parity import check_parity

PROMPTS = ["What is in the image?", "Please provide the bounding box coordinates of the cat in this photo."]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pair(photos):
    return [photos["chelsea"], photos["grace_hopper"]]


def test_fp32_every_activation_family_matches(llava_dir, pair):
    report = check_parity(llava_dir, pair, PROMPTS, max_new_tokens=20, verbose=False)
    table = report.to_dataframe().set_index("family")
    expected = {
        "vision hidden states", "vision attention", "vision features", "projector output", "inputs embeds",
        "LM hidden states", "LM attention", "LM final norm", "logits", "logits (hooks attached)", "logits (auto attention)",
    }  # fmt: skip
    assert expected <= set(table.index)
    eager = table.drop(index="logits (auto attention)")
    assert (eager["max_abs"] <= TOLERANCE).all(), str(report)
    # SDPA (no pattern hook attached) reorders the same sums: within 1e-5 of the logits' scale
    assert table.loc["logits (auto attention)", "max_rel"] <= TOLERANCE, str(report)
    assert report.generation_match and report.auto_generation_match, str(report)
    assert report.ok and str(report).endswith("PASS: every activation within tolerance, generations identical")
    assert all(len(tokens) == 20 for tokens in report.hooked_tokens), report.hooked_tokens  # no early EOS


def test_fp32_single_image_generation_matches(tiny_checkpoint, photos):
    report = check_parity(tiny_checkpoint("llava_base"), [photos["coffee"]], ["Describe the image."], max_new_tokens=20, verbose=False)
    assert report.generation_match and report.auto_generation_match and report.ok
    assert len(report.hooked_tokens[0]) == 20


@pytest.mark.parametrize(
    ("parameter", "first"),
    [
        ("blocks.0.mlp.down_proj.weight", "blocks.0.hook_mlp_out"),  # the MLP's own output is compared
        ("vision.blocks.0.attn.k_proj.weight", "vision.blocks.0.attn.hook_pattern"),
        ("projector.linear_2.weight", "projector.hook_out"),
    ],
)
def test_a_perturbed_weight_fails_naming_the_first_diverging_activation(tiny_checkpoint, pair, parameter, first):
    directory = tiny_checkpoint("llava_base")
    hooked = HookedVLM.from_pretrained(directory)
    with torch.no_grad():
        hooked.get_parameter(parameter).mul_(1.01)
    report = check_parity(directory, pair, PROMPTS, max_new_tokens=0, verbose=False, hooked=hooked)
    assert not report.ok
    assert report.first_divergence["name"] == first, str(report)
    assert f"FAIL: first diverging activation: {first} " in str(report)
    assert hooked.attention_implementation == "auto"


def test_check_parity_restores_the_attention_implementation(tiny_checkpoint, pair):
    directory = tiny_checkpoint("llava_base")
    hooked = HookedVLM.from_pretrained(directory)
    hooked.set_attention_implementation("eager")
    assert check_parity(directory, pair, PROMPTS, max_new_tokens=2, verbose=False, hooked=hooked).ok
    assert hooked.attention_implementation == "eager"


def test_an_original_format_checkpoint_is_refused_before_loading(tiny_checkpoint, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking the format")

    monkeypatch.setattr(HookedVLM, "from_pretrained", no_loading)
    with pytest.raises(NotImplementedError, match="needs a Hugging Face-format checkpoint"):
        check_parity(tiny_checkpoint("llava_original"), verbose=False)


def test_bf16_eager_is_bit_identical_and_generations_agree(tiny_checkpoint, pair):
    """Same operations in the same order in bf16: zero difference is the right tolerance."""
    report = check_parity(tiny_checkpoint("llava_multilayer"), pair, PROMPTS, dtype=torch.bfloat16, max_new_tokens=20, verbose=False)
    table = report.to_dataframe().set_index("family").drop(index="logits (auto attention)")
    assert (table["max_abs"] == 0).all(), str(report)
    assert report.generation_match and report.ok, str(report)


def test_bf16_sdpa_path_is_within_the_references_own_eager_sdpa_gap(tiny_checkpoint, pair):
    """The default attention path uses SDPA when no pattern hook is attached. In bf16 its logits
    may differ from HF eager by as much as HF's own SDPA does; we allow twice that gap."""
    directory = tiny_checkpoint("llava_multilayer")
    model = HookedVLM.from_pretrained(directory, dtype=torch.bfloat16)
    inputs = model.prepare(pair, PROMPTS)
    kwargs = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)
    logits = {}
    for impl in ("eager", "sdpa"):
        reference = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation=impl)
        with torch.no_grad():
            logits[impl] = reference(**kwargs).logits.float()
    with torch.no_grad():
        ours = model(inputs).float()
    reference_gap = (logits["sdpa"] - logits["eager"]).abs().max()
    assert reference_gap > 0
    assert (ours - logits["eager"]).abs().max() <= 2 * reference_gap
