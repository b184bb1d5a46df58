"""InternVL-3.5 mixture-of-experts checkpoints (Qwen3-MoE language model): per-expert tensors
(4.x -HF repos, transformers' save_pretrained, the original remote-code format) stacked into the
fused expert parameters, the fused layout transformers 5.x holds in memory, the real 30B-A3B and
241B-A28B configs on the meta device, and loud errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_internvl_conversion import _assert_same_weights
from transformers import InternVLForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion

from hooked_vlm import HookedVLM
from hooked_vlm.components import MLP, MoEMLP
from hooked_vlm.testing import fuse_expert_tensors, load_runtime_state_dict, real_config
from weights_conversion import ConversionError
from weights_conversion.internvl import config_from_internvl_hf, plan_internvl_hf
from weights_conversion.io import check_plan


@pytest.fixture(scope="module")
def moe_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("internvl_moe")


@pytest.fixture(scope="module")
def model(moe_dir) -> HookedVLM:
    return HookedVLM.from_pretrained(moe_dir)


def test_original_and_hf_formats_load_to_identical_models(tiny_checkpoint, model):
    original = HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe_original"))
    assert original.cfg.checkpoint_format == "internvl-original"
    config = json.loads((tiny_checkpoint("internvl_moe_original") / "config.json").read_text())
    assert config["llm_config"]["model_type"] == "qwen3_moe"
    _assert_same_weights(model, original)
    assert original.cfg.text == model.cfg.text and original.cfg.vision == model.cfg.vision


def test_per_expert_tensors_are_stacked_gate_rows_then_up_rows(moe_dir, model):
    state = load_runtime_state_dict(moe_dir)
    prefix = "model.language_model.layers.1.mlp"
    assert f"{prefix}.experts.7.gate_proj.weight" in state  # the per-expert layout on disk
    mlp, d_mlp = model.blocks[1].mlp, model.cfg.d_mlp
    for e in range(model.cfg.num_experts):
        assert torch.equal(mlp.gate_up_proj[e, :d_mlp], state[f"{prefix}.experts.{e}.gate_proj.weight"])
        assert torch.equal(mlp.gate_up_proj[e, d_mlp:], state[f"{prefix}.experts.{e}.up_proj.weight"])
        assert torch.equal(mlp.down_proj[e], state[f"{prefix}.experts.{e}.down_proj.weight"])
    assert torch.equal(mlp.router.weight, state[f"{prefix}.gate.weight"])
    # and exactly as transformers fuses them at load time
    reference = InternVLForConditionalGeneration.from_pretrained(moe_dir).model.language_model.layers[1].mlp
    assert torch.equal(mlp.gate_up_proj, reference.experts.gate_up_proj)
    assert torch.equal(mlp.down_proj, reference.experts.down_proj)


def test_fused_expert_tensors_load_identically(moe_dir, model, tmp_path):
    """The layout transformers 5.x holds in memory (`experts.gate_up_proj`, `experts.down_proj`)."""
    fused = tmp_path / "fused"
    shutil.copytree(moe_dir, fused)
    fuse_expert_tensors(fused)
    keys = load_file(fused / "model.safetensors").keys()
    assert "language_model.model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
    _assert_same_weights(model, HookedVLM.from_pretrained(fused))
    ours = InternVLForConditionalGeneration.from_pretrained(fused).state_dict()
    theirs = InternVLForConditionalGeneration.from_pretrained(moe_dir).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # transformers reads both layouts alike


def test_config_names_the_experts_and_the_dense_layers(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_moe_top1"))
    text = model.cfg.text
    assert (text.num_experts, text.experts_per_token, text.norm_topk_prob, text.d_mlp) == (4, 1, False, 32)
    assert text.dense_mlp_layers == (1,) and text.d_mlp_dense == 96
    assert [type(block.mlp) for block in model.blocks] == [MoEMLP, MLP, MoEMLP]
    assert model.blocks[1].mlp.down_proj.weight.shape == (text.d_model, 96)


def test_bf16_loading_allocates_the_stacked_experts_in_bf16(moe_dir):
    model = HookedVLM.from_pretrained(moe_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "d_model", "d_expert", "n_layers", "vision_variant"),
    [("internvl3.5-30b-a3b", 2048, 768, 48, "300m"), ("internvl3.5-241b-a28b", 4096, 1536, 94, "6b")],
)
@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_real_configs_build_on_meta_and_every_key_and_shape_matches(name, d_model, d_expert, n_layers, vision_variant, layout):
    """`fused`: the 5.x runtime names and tensors; `per-expert`: what transformers' save_pretrained
    writes (the 4.x hub layout: `language_model.model.layers.{l}.mlp.experts.{e}.gate_proj.weight`)."""
    hf_config = real_config(name)
    with torch.device("meta"):
        reference = InternVLForConditionalGeneration(hf_config)
    state = reference.state_dict()
    if layout == "per-expert":
        state = revert_weight_conversion(reference, state)
        assert f"language_model.model.layers.{n_layers - 1}.mlp.experts.127.down_proj.weight" in state
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg = config_from_internvl_hf(hf_config, list(shapes), torch.bfloat16)
    with torch.device("meta"):
        model = HookedVLM(cfg)
    plan = plan_internvl_hf(list(shapes), cfg.vision.n_layers)
    check_plan(plan, model, {"main": shapes})  # raises on any unknown/missing key, shape mismatch or gap
    assert not plan.ignored and len(plan.assignments) == len(shapes)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    text = cfg.text
    shape = (text.d_model, text.n_layers, text.n_heads, text.n_key_value_heads, text.d_head)
    assert shape == (d_model, n_layers, d_model // 64, 4, 128)
    experts = (text.num_experts, text.experts_per_token, text.norm_topk_prob, text.d_mlp, text.dense_mlp_layers)
    assert experts == (128, 8, True, d_expert, ())
    assert all(isinstance(block.mlp, MoEMLP) for block in model.blocks)
    assert cfg.vision.qk_norm == ("full" if vision_variant == "6b" else None)


def _tampered(source: Path, tmp_path: Path, edit_tensors=None, edit_config=None) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(source, copy)
    if edit_tensors:
        tensors = load_file(copy / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((copy / "config.json").read_text())
        edit_config(config)
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_missing_expert_tensor_is_named(moe_dir, tmp_path):
    copy = _tampered(moe_dir, tmp_path, lambda t: t.pop("language_model.model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"filled twice or only in part: blocks\.1\.mlp\.gate_up_proj$"):
        HookedVLM.from_pretrained(copy)


def test_an_expert_count_unlike_the_config_is_named(moe_dir, tmp_path):
    # transformers 5.x spells num_experts so in config.json
    copy = _tampered(moe_dir, tmp_path, edit_config=lambda c: c["text_config"].update(num_local_experts=16))
    expected = (
        r"(?s)only in part: blocks\.0\.mlp\.down_proj, blocks\.0\.mlp\.gate_up_proj"
        r".*shape mismatches.*blocks\.0\.mlp\.router\.weight \(16, 48\)"
    )
    with pytest.raises(ConversionError, match=expected):
        HookedVLM.from_pretrained(copy)


def test_an_expert_width_unlike_the_config_is_named(moe_dir, tmp_path):
    copy = _tampered(moe_dir, tmp_path, edit_config=lambda c: c["text_config"].update(moe_intermediate_size=48))
    expected = r"shape mismatches.*layers\.0\.mlp\.experts\.0\.down_proj\.weight \(48, 24\) -> blocks\.0\.mlp\.down_proj"
    with pytest.raises(ConversionError, match=expected):
        HookedVLM.from_pretrained(copy)


@pytest.mark.parametrize("checkpoint", ["internvl_6b", "internvl_original"])
def test_gpt_oss_is_refused_by_name(tiny_checkpoint, tmp_path, checkpoint):
    """InternVL3_5-GPT-OSS-20B-A4B-Preview: attention sinks, sliding windows, clamped biased experts."""

    def edit(config):
        config["text_config" if "text_config" in config else "llm_config"]["model_type"] = "gpt_oss"

    copy = _tampered(tiny_checkpoint(checkpoint), tmp_path, edit_config=edit)
    named = r"language model type 'gpt_oss' \(InternVL3_5-GPT-OSS-20B-A4B-Preview\) is not supported"
    with pytest.raises(NotImplementedError, match=named):
        HookedVLM.from_pretrained(copy)
