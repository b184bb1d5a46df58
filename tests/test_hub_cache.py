"""Loading as people load: hub ids through the Hugging Face cache, offline, with a revision.

The cache is laid out as huggingface_hub lays it out (`models--owner--name/blobs`, `snapshots/<commit>`
of relative symlinks, `refs/<branch>`) by `hooked_vlm.testing.hub_cache`, in a temporary directory
named by `cache_dir=` or by `HF_HUB_CACHE` with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants as hub_constants
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.testing.hub_cache import add_to_hub_cache, repo_folder
from weights_conversion.io import ConversionError


def _same_weights(a: HookedVLM, b: HookedVLM) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_CACHE pointing at an empty temporary cache and HF_HUB_OFFLINE=1, as a user sets
    them before starting Python (huggingface_hub reads both into its constants at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_loads_from_the_cache_with_hf_hub_offline(offline, tiny_checkpoint):
    directory = tiny_checkpoint("internvl_6b")
    commit = add_to_hub_cache(offline, "tiny-org/internvl", directory)
    snapshot = repo_folder(offline, "tiny-org/internvl") / "snapshots" / commit
    assert (snapshot / "config.json").is_symlink() and "blobs" in str((snapshot / "config.json").resolve())
    assert _same_weights(HookedVLM.from_pretrained("tiny-org/internvl"), HookedVLM.from_pretrained(directory))


def test_cache_dir_and_local_files_only_load_without_the_environment(tmp_path, tiny_checkpoint):
    cache = tmp_path / "elsewhere"
    add_to_hub_cache(cache, "tiny-org/llava", tiny_checkpoint("llava_base"))
    model = HookedVLM.from_pretrained("tiny-org/llava", cache_dir=cache, local_files_only=True)
    assert _same_weights(model, HookedVLM.from_pretrained(tiny_checkpoint("llava_base")))


def test_a_revision_loads_that_commit_by_hash_or_by_branch(tmp_path, tiny_checkpoint):
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tiny-org/llava", tiny_checkpoint("llava_base"))  # main
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_checkpoint("llava_base"), retrained)
    from safetensors.torch import load_file, save_file

    tensors = {k: v + 1 for k, v in load_file(retrained / "model.safetensors").items()}
    save_file(tensors, retrained / "model.safetensors", metadata={"format": "pt"})
    commit = add_to_hub_cache(cache, "tiny-org/llava", retrained, branch="v2")
    main = HookedVLM.from_pretrained("tiny-org/llava", cache_dir=cache, local_files_only=True)
    by_hash = HookedVLM.from_pretrained("tiny-org/llava", revision=commit, cache_dir=cache, local_files_only=True)
    by_branch = HookedVLM.from_pretrained("tiny-org/llava", revision="v2", cache_dir=cache, local_files_only=True)
    assert _same_weights(by_hash, by_branch) and not _same_weights(main, by_hash)
    assert torch.equal(by_hash.embed.weight, main.embed.weight + 1)


def test_not_cached_offline_is_one_error_naming_the_repository_and_the_cache(offline, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        HookedVLM.from_pretrained("tiny-org/not-cached")
    message = str(error.value)
    assert "tiny-org/not-cached" in message and str(offline) in message and "HF_HUB_OFFLINE=1" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained connection traceback
    with pytest.raises(FileNotFoundError, match=r"tiny-org/not-cached \(revision 'v9'\) is not in the Hugging Face cache at .*local_files_only=True"):
        HookedVLM.from_pretrained("tiny-org/not-cached", revision="v9", cache_dir=tmp_path / "empty", local_files_only=True)


def test_original_llava_finds_its_clip_tower_through_the_same_cache(tmp_path, tiny_checkpoint):
    """`mm_vision_tower` names a hub repository: it resolves with the same cache and offline
    setting as the checkpoint (the checkpoint's revision is not applied to it)."""
    original = tmp_path / "original"
    shutil.copytree(tiny_checkpoint("llava_original"), original)
    config = json.loads((original / "config.json").read_text())
    clip_dir = config["mm_vision_tower"]
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (original / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "hub"
    commit = add_to_hub_cache(cache, "liuhaotian/llava-tiny", original, branch=None)
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-large-patch14-336 is not in the Hugging Face cache at"):
        HookedVLM.from_pretrained("liuhaotian/llava-tiny", revision=commit, cache_dir=cache, local_files_only=True)
    add_to_hub_cache(cache, "openai/clip-vit-large-patch14-336", clip_dir)
    model = HookedVLM.from_pretrained("liuhaotian/llava-tiny", revision=commit, cache_dir=cache, local_files_only=True)
    assert _same_weights(model, HookedVLM.from_pretrained(tiny_checkpoint("llava_original")))


def test_a_misspelt_toy_model_name_suggests_the_right_one():
    with pytest.raises(FileNotFoundError, match=r"'toy-lava' is neither a local directory nor a hub id .* did you mean the toy model 'toy-llava'\?"):
        HookedVLM.from_pretrained("toy-lava")


def test_dtype_auto_takes_the_checkpoints_dtype(tmp_path, tiny_checkpoint):
    directory = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoint("internvl_6b"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    assert HookedVLM.from_pretrained(directory, dtype="auto").dtype == torch.bfloat16
    del config["dtype"]  # no dtype in the config: the weights' own (float32 here)
    (directory / "config.json").write_text(json.dumps(config))
    assert HookedVLM.from_pretrained(directory, dtype="auto").dtype == torch.float32


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickling ran code')",))


def test_a_bin_only_repository_loads_without_running_pickled_code(tmp_path, tiny_checkpoint, monkeypatch):
    from safetensors.torch import load_file

    repo = tmp_path / "bin-only"
    shutil.copytree(tiny_checkpoint("llava_base"), repo)
    tensors = load_file(repo / "model.safetensors")
    (repo / "model.safetensors").unlink()
    torch.save(tensors, repo / "pytorch_model.bin")
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tiny-org/bin-only", repo)
    loads = []
    original_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or original_load(*a, **kw))
    model = HookedVLM.from_pretrained("tiny-org/bin-only", cache_dir=cache, local_files_only=True)
    assert loads and all(flag is True for flag in loads)
    assert _same_weights(model, HookedVLM.from_pretrained(tiny_checkpoint("llava_base")))
    torch.save(tensors | {"payload": _RunsCode()}, repo / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"cannot read weight file .*pytorch_model\.bin"):
        HookedVLM.from_pretrained(repo)
