"""InternVL checkpoint formats: -HF (4.x legacy and 5.x runtime key layouts), the original
remote-code InternVLChatModel (fused qkv, ls1/ls2, mlp1), real-size configs on the meta device,
and loud errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from internvl_variants import build_internvl_gqa
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from hooked_vlm import HookedVLM
from hooked_vlm.testing import apply_key_layout, export_internvl_original, legacy_key, load_runtime_state_dict, real_config
from weights_conversion import ConversionError, detect_format
from weights_conversion.io import check_plan
from weights_conversion.internvl import config_from_internvl_hf, plan_internvl_hf


def _assert_same_weights(a: HookedVLM, b: HookedVLM) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> Path:
    return build_internvl_gqa(tmp_path_factory.mktemp("internvl_gqa"))


def test_formats_are_detected(tiny_checkpoint):
    for name, fmt in [("internvl_6b", "internvl-hf"), ("internvl_original", "internvl-original")]:
        config = json.loads((tiny_checkpoint(name) / "config.json").read_text())
        assert detect_format(config) == fmt


def test_original_and_hf_formats_load_to_identical_models(tiny_checkpoint):
    hf = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))
    original = HookedVLM.from_pretrained(tiny_checkpoint("internvl_original"))
    assert (hf.cfg.checkpoint_format, original.cfg.checkpoint_format) == ("internvl-hf", "internvl-original")
    _assert_same_weights(hf, original)
    assert original.cfg.image_token_id == hf.cfg.image_token_id  # looked up in the tokenizer
    assert original.cfg.vision == hf.cfg.vision and original.cfg.text == hf.cfg.text
    # tiling settings from the config fields; prompts in the original conversation template (`template`)
    assert original.preprocessing == replace(hf.preprocessing, template="internvl2_5")


@pytest.mark.parametrize("source", ["internvl_300m", "gqa"])
def test_original_export_of_the_300m_tower_loads_identically(tiny_checkpoint, gqa_dir, tmp_path, source):
    """qkv bias split with the weights, LayerNorm tower, a tied head that the export leaves out,
    and vision blocks past `select_layer` that are ignored."""
    hf_dir = gqa_dir if source == "gqa" else tiny_checkpoint(source)
    original = HookedVLM.from_pretrained(export_internvl_original(hf_dir, tmp_path / "original"))
    hf = HookedVLM.from_pretrained(hf_dir)
    _assert_same_weights(hf, original)
    assert hf.cfg.tie_word_embeddings == original.cfg.tie_word_embeddings


def test_fused_qkv_is_split_by_rows_q_k_v(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_original"))
    shards = tiny_checkpoint("internvl_original").glob("*.safetensors")
    state = {k: v for shard in shards for k, v in load_file(shard).items()}
    qkv = state["vision_model.encoder.layers.1.attn.qkv.weight"]
    d = qkv.shape[0] // 3
    attn = model.vision.blocks[1].attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(proj.weight, qkv[i * d : (i + 1) * d])
    assert torch.equal(model.vision.blocks[1].lambda_1, state["vision_model.encoder.layers.1.ls1"])


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_key_layouts_of_4x_and_5x_load_identically(tiny_checkpoint, tmp_path, layout):
    source = tiny_checkpoint("internvl_300m")  # saved by transformers 5.23 as is
    copy = tmp_path / layout
    shutil.copytree(source, copy)
    apply_key_layout(copy, layout, clip_tower=False)
    keys = load_file(copy / "model.safetensors").keys()
    assert any(k.startswith("language_model.model." if layout == "legacy" else "model.language_model.") for k in keys)
    _assert_same_weights(HookedVLM.from_pretrained(source), HookedVLM.from_pretrained(copy))


def test_untied_head_is_loaded_even_when_the_config_says_tie(tiny_checkpoint, tmp_path):
    """InternVL-3.5 ships a separate lm_head while InternVLConfig defaults to tying (pitfall 15)."""
    copy = tmp_path / "says_tie"
    shutil.copytree(tiny_checkpoint("internvl_6b"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (copy / "config.json").write_text(json.dumps(config))
    model = HookedVLM.from_pretrained(copy)
    state = load_runtime_state_dict(copy)
    assert not model.cfg.tie_word_embeddings and model.unembed.weight is not model.embed.weight
    assert torch.equal(model.unembed.weight, state["lm_head.weight"])


def test_tied_head_shares_the_embedding(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_300m"))
    assert model.cfg.tie_word_embeddings and model.unembed.weight is model.embed.weight


def test_vision_blocks_past_the_feature_layer_are_ignored(gqa_dir):
    model = HookedVLM.from_pretrained(gqa_dir)
    assert model.cfg.vision_n_layers_checkpoint == 3 and model.cfg.vision.n_layers == 2
    assert not any(name.startswith("vision.blocks.2.") for name in model.hook_dict)


def test_dtype_is_honoured(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["internvl3.5-1b", "internvl3.5-8b", "internvl3.5-38b"])
@pytest.mark.parametrize("layout", ["runtime", "legacy"])
def test_real_configs_build_on_meta_and_every_key_and_shape_matches(name, layout):
    hf_config = real_config(name)
    with torch.device("meta"):
        reference = InternVLForConditionalGeneration(hf_config)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if layout == "legacy":
        shapes = {legacy_key(k, clip_tower=False): v for k, v in shapes.items()}
    cfg = config_from_internvl_hf(hf_config, list(shapes), torch.bfloat16)
    with torch.device("meta"):
        model = HookedVLM(cfg)
    plan = plan_internvl_hf(list(shapes), cfg.vision.n_layers)
    check_plan(plan, model, {"main": shapes})  # raises on any unknown/missing key or shape mismatch
    assert not plan.ignored and len(plan.assignments) == len(shapes)  # InternVL reads every tensor
    assert not cfg.tie_word_embeddings
    assert cfg.vision.n_layers == hf_config.vision_config.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    is_6b = name.endswith("38b")
    assert cfg.vision.qk_norm == ("full" if is_6b else None) and cfg.vision.normalization_type == ("RMS" if is_6b else "LN")
    assert model.projector.linear_1.weight.shape[1] == 4 * hf_config.vision_config.hidden_size


def _tampered(source: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(source, copy)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_tampered_weight_shape_is_listed(tiny_checkpoint, tmp_path):
    def shrink(tensors):
        key = next(k for k in tensors if k.endswith("multi_modal_projector.linear_1.weight"))
        tensors[key] = tensors[key][:, :-4].contiguous()

    copy = _tampered(tiny_checkpoint("internvl_300m"), tmp_path, shrink)
    with pytest.raises(ConversionError, match=r"1 shape mismatches between config and weights.*projector\.linear_1\.weight"):
        HookedVLM.from_pretrained(copy)


def test_config_and_weights_shape_mismatch_is_listed(tiny_checkpoint, tmp_path):
    copy = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint("internvl_6b"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["intermediate_size"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"shape mismatches between config and weights.*vision\.blocks\.0\.mlp"):
        HookedVLM.from_pretrained(copy)


def test_unknown_and_missing_keys_are_listed(tiny_checkpoint, tmp_path):
    def edit(tensors):
        tensors["vision_tower.encoder.layer.0.mystery.weight"] = torch.zeros(2)
        for key in [k for k in tensors if ".layer.1.mlp.fc2." in k]:
            del tensors[key]

    copy = _tampered(tiny_checkpoint("internvl_300m"), tmp_path, edit)
    expected = r"(?s)1 checkpoint keys not used.*mystery.*2 model parameters missing.*blocks\.1\.mlp\.down_proj"
    with pytest.raises(ConversionError, match=expected):
        HookedVLM.from_pretrained(copy)


def test_original_pixel_shuffle_v1_is_refused(tiny_checkpoint, tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(tiny_checkpoint("internvl_original"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["ps_version"] = "v1"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="ps_version 'v1' is not supported"):
        HookedVLM.from_pretrained(copy)
    del config["ps_version"]  # the original config class defaults to v1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="ps_version"):
        HookedVLM.from_pretrained(copy)


def test_unsupported_language_models_are_named(tiny_checkpoint, tmp_path):
    copy = tmp_path / "qwen2"
    shutil.copytree(tiny_checkpoint("internvl_6b"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["model_type"] = "mistral"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="language model type 'mistral'"):
        HookedVLM.from_pretrained(copy)


def test_a_truncated_checkpoint_is_named(tiny_checkpoint, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint("internvl_300m"), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=r"cannot read weight file .*model\.safetensors \(corrupt, truncated"):
        HookedVLM.from_pretrained(copy)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match=r"unknown architecture: model_type='internlm2'"):
        detect_format({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]})


def test_image_count_mismatch_in_the_forward_is_caught(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))
    inputs = model.prepare([photos["chelsea"], photos["astronaut"]], ["a", "b"])
    one_view_short = inputs.pixel_values[:-1]
    from dataclasses import replace

    with pytest.raises(ValueError, match="image tokens but the images produced"):
        model(replace(inputs, pixel_values=one_view_short))
