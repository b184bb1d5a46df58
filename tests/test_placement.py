"""Placement by accelerate: device maps computed from the meta-device model within `max_memory`.

The maps are computed for the real InternVL3.5-38B on fake GPUs (accelerate takes GPU indices
that do not exist, for computing). The loading path is then run end to end on CPU by standing
the meta device in for the second GPU: the forward must move every activation to the device of
the module it enters (a meta activation entering a CPU module, or the reverse, is caught), and the
same map on one real device must give exactly the unplaced model's outputs.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from accelerate.utils import compute_module_sizes

from hooked_vlm import HookedVLM
from hooked_vlm.testing import real_config
from weights_conversion import placement
from weights_conversion.internvl import config_from_internvl_hf
from weights_conversion.placement import Placement, infer_device_map

GiB = 2**30


def _meta_internvl(name: str, tie: bool = False) -> HookedVLM:
    hf = real_config(name)
    hf.tie_word_embeddings = tie
    cfg = config_from_internvl_hf(hf, [] if tie else ["lm_head.weight"], torch.bfloat16)
    with torch.device("meta"):
        return HookedVLM(cfg)


@pytest.fixture(scope="module")
def internvl_38b() -> HookedVLM:
    return _meta_internvl("internvl3.5-38b")  # 71.5 GiB in bf16; its InternViT-6B tower alone 10.3 GiB


def _bytes_per_device(model, device_map) -> Counter:
    sizes, used = compute_module_sizes(model), Counter()
    for name, device in device_map.items():
        used[device] += sizes[name]
    return used


def _assert_no_block_split(device_map) -> None:
    inside = [k for k in device_map if re.match(r"(vision\.)?blocks\.\d+\.", k) or k.startswith("projector.")]
    assert not inside, f"split modules: {inside}"


def test_sequential_fills_each_gpu_in_turn_within_max_memory(internvl_38b):
    device_map = infer_device_map(internvl_38b, "sequential", {0: "45GiB", 1: "45GiB"})
    used = _bytes_per_device(internvl_38b, device_map)
    assert set(used) == {0, 1} and max(used.values()) <= 45 * GiB and used[0] > 40 * GiB
    _assert_no_block_split(device_map)
    assert (device_map["vision"], device_map["embed"], device_map["unembed"]) == (0, 0, 1)


def test_balanced_spreads_the_model_evenly_and_balanced_low_0_keeps_gpu_0_light(internvl_38b):
    memory = {0: "60GiB", 1: "60GiB", 2: "60GiB"}
    balanced = _bytes_per_device(internvl_38b, infer_device_map(internvl_38b, "balanced", memory))
    assert set(balanced) == {0, 1, 2} and max(balanced.values()) < 1.3 * min(balanced.values())
    assert infer_device_map(internvl_38b, "auto", memory) == infer_device_map(internvl_38b, "balanced", memory)
    low_0 = _bytes_per_device(internvl_38b, infer_device_map(internvl_38b, "balanced_low_0", memory))
    assert low_0[0] < 0.5 * min(low_0[1], low_0[2])


def test_a_vision_tower_larger_than_a_gpu_is_split_between_its_blocks(internvl_38b):
    device_map = infer_device_map(internvl_38b, "sequential", {0: "6GiB", 1: "40GiB", 2: "40GiB"})
    vision_devices = {device for name, device in device_map.items() if name.startswith("vision.blocks.")}
    assert vision_devices == {0, 1}
    _assert_no_block_split(device_map)
    assert device_map["projector"] == 1  # placed too, whole


def test_tied_embeddings_stay_on_one_device():
    model = _meta_internvl("internvl3.5-1b", tie=True)
    sizes = compute_module_sizes(model)
    assert model.unembed.weight is model.embed.weight
    # room on GPU 0 for the tower, projector, embedding and a few blocks, not for everything
    budget = sizes["vision"] + sizes["projector"] + sizes["embed"] + 4 * sizes["blocks.0"]
    for strategy in ("sequential", "balanced"):
        chosen = Placement(device_map=strategy, max_memory={0: budget, 1: 10 * GiB})
        chosen.resolve(model)
        assert set(chosen.hf_device_map.values()) == {0, 1}
        assert chosen("embed.weight") == chosen("unembed.weight")
    assert model.unembed.weight is model.embed.weight  # still tied after the computation


def test_a_model_that_does_not_fit_is_refused_rather_than_offloaded(internvl_38b):
    with pytest.raises(ValueError, match=r"does not fit .* offloaded to disk, which HookedVLM does not do"):
        infer_device_map(internvl_38b, "sequential", {0: "10GiB", 1: "10GiB"})


def test_bad_device_maps_are_named():
    with pytest.raises(ValueError, match="device_map must be a dict, one of"):
        Placement(device_map="everywhere")
    with pytest.raises(ValueError, match="max_memory is only used with device_map set to one of"):
        Placement(device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    assert Placement(device_map="cpu").device_map == {"": torch.device("cpu")}  # transformers' device_map="cuda:1"


def test_auto_without_gpus_places_everything_within_the_cpus_memory(tiny_checkpoint, photos):
    directory = tiny_checkpoint("internvl_300m")  # tied embeddings
    plain = HookedVLM.from_pretrained(directory)
    auto = HookedVLM.from_pretrained(directory, device_map="auto", max_memory={"cpu": "2GiB"})
    assert auto.hf_device_map == {"": "cpu"} and plain.hf_device_map == {"": "cpu"}
    inputs = plain.prepare(photos["coffee"], "What is this?")
    with torch.no_grad():
        assert torch.equal(auto(inputs), plain(inputs))
    with pytest.raises(ValueError, match="offloaded to disk"):
        HookedVLM.from_pretrained(directory, device_map="auto", max_memory={"cpu": 1000})


# ----------------------------------------------------------------------------------- end to end
def _fake_gpus(device) -> torch.device:
    """GPU 0 is the CPU, GPU 1 the meta device (shapes only)."""
    if isinstance(device, int):
        return torch.device(["cpu", "meta"][device])
    return torch.device(device)


def _check_devices(model: HookedVLM) -> list:
    """Forward pre-hooks on every module holding weights: its inputs must be on its device."""

    def check(module, args):
        device = next(module.parameters(recurse=False)).device
        for arg in args:
            if isinstance(arg, torch.Tensor):
                assert arg.device == device, f"{type(module).__name__} on {device} got an input on {arg.device}"

    leaves = [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    return [m.register_forward_pre_hook(check) for m in leaves]


@pytest.mark.parametrize("name", ["llava_base", "internvl_6b"])
def test_from_pretrained_places_by_accelerate_and_every_activation_follows(tiny_checkpoint, photos, monkeypatch, name):
    directory = tiny_checkpoint(name)
    plain = HookedVLM.from_pretrained(directory)
    inputs = plain.prepare(photos["chelsea"], "Where is the cat?")
    sizes = compute_module_sizes(plain)
    # GPU 0: the towers, the embedding and the first block (accelerate also keeps room for the
    # largest layer there); the meta stand-in cannot run the data-dependent image merge
    largest = max(sizes[name] for name in ("embed", "unembed", "blocks.0", "vision.blocks.0"))
    gpu_0 = sizes["vision"] + sizes["projector"] + sizes["embed"] + sizes["blocks.0"] + largest
    monkeypatch.setattr(placement, "torch_device", _fake_gpus)
    placed = HookedVLM.from_pretrained(directory, device_map="sequential", max_memory={0: gpu_0, 1: sizes[""]})
    device_map = placed.hf_device_map
    assert set(device_map.values()) == {0, 1}
    _assert_no_block_split(device_map)
    for param_name, param in placed.named_parameters():
        owner = max((k for k in device_map if k == "" or param_name == k or param_name.startswith(k + ".")), key=len)
        assert param.device == _fake_gpus(device_map[owner]), param_name
    handles = _check_devices(placed)
    try:
        with torch.no_grad():
            logits, cache = placed.run_with_cache(inputs)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        expected = plain(inputs)
    assert logits.device == placed.unembed.weight.device and logits.shape == expected.shape
    assert cache["hook_embed"].device.type == "cpu" and cache[f"blocks.{plain.cfg.n_layers - 1}.hook_resid_post"].device.type == "meta"

    monkeypatch.undo()
    one_device = HookedVLM.from_pretrained(directory, device_map={k: "cpu" for k in device_map})
    assert one_device.hf_device_map == {k: "cpu" for k in device_map}
    with torch.no_grad():
        assert torch.equal(one_device(inputs), expected)
    assert torch.equal(one_device.generate(inputs, 6, return_tokens=True), plain.generate(inputs, 6, return_tokens=True))
