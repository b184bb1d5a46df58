"""InternVL-3.5: the hooked model is numerically the Hugging Face model.

Comparisons go through `hooked_vlm.parity.check_parity` (the tool users run on real checkpoints)
on five tiny random configurations — InternViT-300M and -6B style towers, GQA ratio 1 and 2,
tied and untied heads, 56- and 72-px tiles, the last and the second-to-last vision layer, Qwen3 and
Qwen3-MoE language models (top-2 renormalised, top-1 raw with a dense layer) — with
real photos giving one tile, several, and the maximum number, in batches of 2 with left padding.
"""

from __future__ import annotations

import pytest
import torch
from internvl_variants import VARIANTS, variant_directory
from PIL import Image
from transformers import InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from hooked_vlm import HookedVLM
from hooked_vlm.parity import check_parity
from hooked_vlm.testing import build_internvl_tokenizer, randomize_weights_, real_config

PROMPTS = ["What is in the image?", "Please provide the bounding box coordinate of the woman."]
TOLERANCE = 1e-5
EAGER_FAMILIES = {
    "vision hidden states", "vision attention", "pixel shuffle", "projector output", "inputs embeds",
    "LM hidden states", "LM attention", "LM final norm", "logits", "logits (hooks attached)",
}  # fmt: skip


@pytest.fixture(scope="module", params=VARIANTS)
def directory(request, tiny_checkpoint, tmp_path_factory):
    return variant_directory(request.param, tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def model(directory):
    return HookedVLM.from_pretrained(directory)


@pytest.fixture(scope="module")
def reference(directory):
    return InternVLForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()


def _batches(photos) -> dict[str, list[Image.Image]]:
    small = photos["astronaut"].resize((40, 40), Image.BICUBIC)  # below the tie-rule area: one tile
    return {
        "max tiles + several": [photos["chelsea"], photos["grace_hopper_tall"]],
        "one tile + wide": [small, photos["coffee_wide"]],
    }


@pytest.mark.parametrize("batch", ["max tiles + several", "one tile + wide"])
def test_fp32_every_activation_family_and_generation_match(directory, model, reference, photos, batch):
    images = _batches(photos)[batch]
    report = check_parity(directory, images, PROMPTS, max_new_tokens=20, verbose=False, hooked=model, reference=reference)
    table = report.to_dataframe().set_index("family")
    assert EAGER_FAMILIES | {"logits (auto attention)"} <= set(table.index)
    eager = table.drop(index="logits (auto attention)")
    assert (eager["max_abs"] <= TOLERANCE).all(), str(report)
    # SDPA (no pattern hook attached) reorders the same sums: within 1e-5 of the logits' scale
    assert table.loc["logits (auto attention)", "max_rel"] <= TOLERANCE, str(report)
    assert report.generation_match and report.auto_generation_match and report.ok, str(report)
    assert all(len(tokens) == 20 for tokens in report.hooked_tokens), report.hooked_tokens  # no early EOS


def test_batches_hold_one_several_and_the_maximum_number_of_views(model, photos):
    batches = _batches(photos)
    views = {name: [len(v) for v in model.prepare(images, PROMPTS).layout.views] for name, images in batches.items()}
    tiles = model.preprocessing.max_tiles
    flat = [n for counts in views.values() for n in counts]
    assert 1 in flat and tiles + 1 in flat and any(2 < n < tiles + 1 for n in flat), views


@torch.no_grad()
def test_selected_features_are_the_feature_layer_without_cls(model, reference, photos):
    """`vision.hook_features` is what HF's `get_image_features` reads: hidden_states[k][:, 1:]."""
    inputs = model.prepare([photos["rocket"], photos["grace_hopper"]], PROMPTS)
    _, cache = model.run_with_cache(inputs, names_filter="vision.hook_features")
    ref = reference.model.vision_tower(inputs.pixel_values, output_hidden_states=True)
    layer = reference.config.vision_feature_layer
    expected = (ref.last_hidden_state if layer == -1 else ref.hidden_states[layer])[:, 1:]
    assert (cache["vision.hook_features"] - expected).abs().max() <= TOLERANCE
    assert model.cfg.vision.n_layers == len(ref.hidden_states) - 1 + (layer + 1 if layer < 0 else 0)


@pytest.mark.parametrize(
    ("parameter", "first"),
    [
        ("vision.blocks.0.lambda_1", "vision.blocks.1.hook_resid_pre"),  # layer scale: the block's output
        ("blocks.0.attn.q_norm.weight", "blocks.0.attn.hook_pattern"),  # Qwen3's per-head q norm
    ],
)
def test_a_perturbed_weight_fails_naming_the_first_diverging_activation(directory, photos, parameter, first):
    hooked = HookedVLM.from_pretrained(directory)
    with torch.no_grad():
        hooked.get_parameter(parameter).mul_(1.01)
    report = check_parity(directory, _batches(photos)["one tile + wide"], PROMPTS, max_new_tokens=0, verbose=False, hooked=hooked)
    assert not report.ok and report.first_divergence["name"] == first, str(report)


def test_bf16_eager_is_bit_identical_and_generations_agree(directory, photos):
    """Same operations in the same order in bf16 (InternViT's softmax in bf16 too): zero difference."""
    images = _batches(photos)["max tiles + several"]
    report = check_parity(directory, images, PROMPTS, dtype=torch.bfloat16, max_new_tokens=20, verbose=False)
    table = report.to_dataframe().set_index("family").drop(index="logits (auto attention)")
    assert (table["max_abs"] == 0).all(), str(report)
    assert report.generation_match and report.ok, str(report)


@torch.no_grad()
def test_every_hook_is_causal(model, photos):
    """A value returned by any hook, in both towers and the projector, changes the logits."""
    inputs = model.prepare([photos["rocket"], photos["coffee_wide"]], PROMPTS)
    clean = model(inputs)
    for name in model.hook_dict:
        patched = model.run_with_hooks(inputs, fwd_hooks=[(name, lambda x, hook: x * 1.5 + 0.1)])
        assert not torch.equal(patched, clean), name


@pytest.mark.slow
def test_real_size_internvl3_5_1b_with_random_weights_matches_hf(tmp_path, photos):
    """The InternVL3.5-1B architecture at full size (~1.06B parameters, 448-px tiles, 256 tokens
    per view), random weights, one photo (one tile), against the HF eager model. Minutes on a CPU."""
    tokenizer = build_internvl_tokenizer()
    config = real_config("internvl3.5-1b")
    # the tiny tokenizer's special-token ids stand in for the real ones (same architecture)
    config.image_token_id = tokenizer.context_image_token_id
    ids = tokenizer.convert_tokens_to_ids
    config.text_config.bos_token_id = config.text_config.pad_token_id = ids("<|endoftext|>")
    config.text_config.eos_token_id = ids("<|im_end|>")
    reference = InternVLForConditionalGeneration._from_config(config, attn_implementation="eager")
    randomize_weights_(reference, seed=0).eval()
    assert sum(p.numel() for p in reference.parameters()) > 1_000_000_000
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, min_patches=1, max_patches=12, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(tmp_path)  # fmt: skip
    report = check_parity(tmp_path, [photos["astronaut"]], ["Describe the image."], max_new_tokens=20, reference=reference)
    table = report.to_dataframe().set_index("family")
    assert (table.drop(index="logits (auto attention)")["max_abs"] <= TOLERANCE).all(), str(report)
    assert table.loc["logits (auto attention)", "max_rel"] <= TOLERANCE, str(report)
    assert report.generation_match, str(report)
