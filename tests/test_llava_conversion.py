"""LLaVA checkpoint formats: llava-hf (4.x legacy, 5.x runtime and 5.23-saved key layouts, sharded
safetensors), original liuhaotian (.bin shards + separate CLIP tower), real-size configs on the
meta device, loud errors, hub ids and offline mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from hooked_vlm import HookedVLM
from hooked_vlm.testing import legacy_key, real_config
from weights_conversion import ConversionError, detect_format
from weights_conversion.io import check_plan
from weights_conversion.llava import config_from_llava_hf, plan_llava_hf


def _params(model: HookedVLM) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _assert_same_weights(a: HookedVLM, b: HookedVLM) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_original_and_hf_formats_load_to_identical_models(tiny_checkpoint):
    hf = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    original = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    assert original.cfg.checkpoint_format == "llava-original" and hf.cfg.checkpoint_format == "llava-hf"
    pa, pb = _params(hf), _params(original)
    assert pa.keys() == pb.keys()
    base_vocab = original.cfg.d_vocab  # the original vocabulary has no <image>/<pad> rows
    for name in pa:
        expected = pa[name][:base_vocab] if name in ("embed.weight", "unembed.weight") else pa[name]
        assert torch.equal(expected, pb[name]), name


def test_original_format_defaults_to_padding_and_the_vicuna_prompt(tiny_checkpoint, photos):
    original = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    assert original.preprocessing.image_mode == "pad" and original.preprocessing.template == "vicuna_v1"
    inputs = original.prepare(photos["coffee"], "What is this?")
    assert inputs.text[0].startswith("A chat between a curious user")
    hf = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    same = hf.prepare(photos["coffee"], "What is this?", image_mode="pad")
    assert torch.equal(inputs.pixel_values, same.pixel_values)
    # identical weights and pixels -> identical image features
    with torch.no_grad():
        assert torch.equal(original.encode_images(inputs.pixel_values), hf.encode_images(same.pixel_values))


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_key_layouts_of_4x_and_5x_load_identically(tiny_checkpoint, tmp_path, layout):
    source = tiny_checkpoint("llava_full")  # saved by transformers 5.23 as is
    copy = tmp_path / layout
    shutil.copytree(source, copy)
    from hooked_vlm.testing import apply_key_layout

    apply_key_layout(copy, layout, clip_tower=True)
    keys = load_file(copy / "model.safetensors").keys()
    assert any(k.startswith("language_model.model." if layout == "legacy" else "model.language_model.") for k in keys)
    _assert_same_weights(HookedVLM.from_pretrained(source), HookedVLM.from_pretrained(copy))


def test_sharded_safetensors_load_identically(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llava_base")
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    (sharded / "model.safetensors").unlink()
    LlavaForConditionalGeneration.from_pretrained(source).save_pretrained(sharded, max_shard_size="60KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    _assert_same_weights(HookedVLM.from_pretrained(source), HookedVLM.from_pretrained(sharded))


def test_a_truncated_or_corrupt_shard_is_named(tiny_checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("llava_base"), sharded)
    (sharded / "model.safetensors").unlink()
    LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint("llava_base")).save_pretrained(sharded, max_shard_size="60KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    for content in (data[: len(data) // 2], data[:5], b"not a safetensors file" * 10):
        shard.write_bytes(content)
        with pytest.raises(ConversionError, match=rf"cannot read weight file .*{shard.name} \(corrupt, truncated"):
            HookedVLM.from_pretrained(sharded)


def test_a_truncated_bin_shard_of_the_original_format_is_named(tiny_checkpoint, tmp_path):
    copy = tmp_path / "original"
    shutil.copytree(tiny_checkpoint("llava_original"), copy)
    shard = sorted(copy.glob("pytorch_model-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConversionError, match=rf"cannot read weight file .*{shard.name}"):
        HookedVLM.from_pretrained(copy)


def test_dtype_and_device_are_honoured(tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.parameters())
    by_name = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"), dtype="bf16")
    assert {p.dtype for p in by_name.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"unknown dtype 'float17'; use a torch dtype or one of"):
        HookedVLM.from_pretrained(tiny_checkpoint("llava_base"), dtype="float17")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype"):
        HookedVLM.from_pretrained(tiny_checkpoint("llava_base"), dtype=torch.int8)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
@pytest.mark.parametrize("layout", ["runtime", "legacy"])
def test_real_configs_build_on_meta_and_every_key_and_shape_matches(name, layout):
    hf_config = real_config(name)
    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(hf_config)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if layout == "legacy":
        shapes = {legacy_key(k, clip_tower=True): v for k, v in shapes.items()}
    cfg = config_from_llava_hf(hf_config, list(shapes), torch.float16)
    with torch.device("meta"):
        model = HookedVLM(cfg)
    plan = plan_llava_hf(list(shapes), cfg.vision.n_layers)
    check_plan(plan, model, {"main": shapes})  # raises on any unknown/missing key or shape mismatch
    assert len(plan.assignments) == len(dict(model.named_parameters()))
    # only what LLaVA never reads is left out: CLIP's last block and post-norm
    unused = lambda k: "vision_tower" in k and (".post_layernorm." in k or ".layers.23." in k)  # noqa: E731
    assert plan.ignored and all(unused(k) for k in plan.ignored), plan.ignored
    assert cfg.vision.n_layers == 23 and cfg.n_layers == hf_config.text_config.num_hidden_layers
    expected_params = sum(p.numel() for n, p in reference.named_parameters() if not unused(n))
    assert sum(p.numel() for p in model.parameters()) == expected_params


def _tampered(source: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(source, copy)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_unknown_keys_are_listed(tiny_checkpoint, tmp_path):
    copy = _tampered(tiny_checkpoint("llava_base"), tmp_path, lambda t: t.update({"language_model.model.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"1 checkpoint keys not used by any rule: language_model\.model\.mystery\.weight"):
        HookedVLM.from_pretrained(copy)


def test_missing_keys_are_listed(tiny_checkpoint, tmp_path):
    def drop(tensors):
        for key in [k for k in tensors if "layers.1.mlp" in k and "language_model" in k]:
            del tensors[key]

    copy = _tampered(tiny_checkpoint("llava_base"), tmp_path, drop)
    with pytest.raises(ConversionError, match=r"3 model parameters missing.*blocks\.1\.mlp\.down_proj\.weight"):
        HookedVLM.from_pretrained(copy)


def test_config_and_weights_shape_mismatch_is_listed(tiny_checkpoint, tmp_path):
    copy = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint("llava_base"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"shape mismatches between config and weights.*mlp\.down_proj"):
        HookedVLM.from_pretrained(copy)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match=r"unknown architecture: model_type='gpt2'"):
        detect_format({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_not_a_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        HookedVLM.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HookedVLM.from_pretrained(tmp_path)


def test_hub_id_resolves_from_the_local_cache_in_offline_mode(tiny_checkpoint, tmp_path, monkeypatch):
    """A hub id is resolved by huggingface_hub; with HF_HUB_OFFLINE=1 it is served from the cache
    (built here by hand in the hub's cache layout) and never touches the network."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llava"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_checkpoint("llava_base"), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = HookedVLM.from_pretrained("tiny-org/tiny-llava")
    _assert_same_weights(model, HookedVLM.from_pretrained(tiny_checkpoint("llava_base")))
    with pytest.raises(Exception, match="(?i)offline|cannot find|not found|connection"):
        HookedVLM.from_pretrained("tiny-org/not-cached")


def test_device_map_places_every_module_where_asked(tiny_checkpoint, photos):
    """Only one device here, so this checks the placement logic and that activations hop
    between block devices (meta would be the other device, but cannot run)."""
    directory = tiny_checkpoint("llava_base")
    device_map = {"vision": "cpu", "projector": "cpu", "embed": "cpu", "blocks.0": "cpu", "blocks.1": "meta", "ln_final": "meta", "unembed": "meta"}
    placed = HookedVLM.from_pretrained(directory, device_map=device_map)
    for name, param in placed.named_parameters():
        expected = "meta" if name.startswith(("blocks.1.", "ln_final", "unembed")) else "cpu"
        assert param.device.type == expected, name
    everything_on_cpu = {k: "cpu" for k in device_map}
    split = HookedVLM.from_pretrained(directory, device_map=everything_on_cpu)
    auto = HookedVLM.from_pretrained(directory, device_map="auto")  # no GPU: all on the default device
    plain = HookedVLM.from_pretrained(directory)
    inputs = plain.prepare(photos["coffee"], "What is this?")
    with torch.no_grad():
        assert torch.equal(split(inputs), plain(inputs)) and torch.equal(auto(inputs), plain(inputs))
    with pytest.raises(ValueError, match="device_map does not place '"):
        HookedVLM.from_pretrained(directory, device_map={"vision": "cpu"})
    with pytest.raises(ValueError, match=r"device_map keys \['vison', 'blocks.7'\] name no module of the model"):
        HookedVLM.from_pretrained(directory, device_map={"": "cpu", "vison": "cpu", "blocks.7": "cpu"})
    everything = HookedVLM.from_pretrained(directory, device_map={"": "cpu"})  # accelerate's "the whole model"
    with torch.no_grad():
        assert torch.equal(everything(inputs), plain(inputs))


def test_generation_stops_at_every_eos_of_the_generation_config_as_hugging_face_does(tiny_checkpoint, tmp_path, photos):
    copy = tmp_path / "two-eos"
    shutil.copytree(tiny_checkpoint("llava_base"), copy)
    model = HookedVLM.from_pretrained(copy)
    inputs = model.prepare(photos["coffee"], "Describe the image.")
    free = model.generate(inputs, max_new_tokens=8, return_tokens=True)[0].tolist()
    stop = free[2]  # a token the model emits third, made an end of sequence
    assert stop not in model.cfg.eos_token_ids and stop not in free[:2]
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [model.cfg.eos_token_ids[0], stop]
    (copy / "generation_config.json").write_text(json.dumps(config))
    from hooked_vlm.parity import check_parity

    report = check_parity(copy, [photos["coffee"]], ["Describe the image."], max_new_tokens=8, verbose=False)
    assert report.generation_match and report.hooked_tokens == [free[:3]], (report.hooked_tokens, free)
