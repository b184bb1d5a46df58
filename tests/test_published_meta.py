"""The full-size published configs build on the meta device, and their checkpoints' keys and shapes fit.

For every row of the published table, the checkpoint's tensor names and shapes are derived from
its published config (transformers' model of the HF twin on the meta device, under the hub's names;
the original formats through the inverse of the conversion), checked against the real weight
index where it was found (the number of keys, a fingerprint of their names, the total bytes and
parameter count of its metadata), and then handed to the loader's own config mapping and
conversion plan, which must claim every key with a parameter of the same shape.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, CLIPModel, InternVLForConditionalGeneration, LlavaForConditionalGeneration

from hooked_vlm import HookedVLM
from hooked_vlm.testing import legacy_key
from hooked_vlm.testing.internvl import _original_internvl_tensors
from hooked_vlm.testing.llava import _original_llava_tensors
from hooked_vlm.testing.published import CLIP_REPO, PUBLISHED, key_fingerprint, published_repo, write_metadata_and_tokenizer
from weights_conversion import internvl, llava
from weights_conversion.io import check_plan, load_tokenizer, read_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _meta_state(directory) -> dict[str, torch.Tensor]:
    """The HF-format model of `directory`'s config on the meta device, runtime names."""
    config = AutoConfig.from_pretrained(directory)
    model_class = LlavaForConditionalGeneration if config.model_type == "llava" else InternVLForConditionalGeneration
    with torch.device("meta"):
        return dict(model_class(config).state_dict())


def published_tensors(repo_id: str, tmp_path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the repository's weights as stored on the hub, derived from its config."""
    row = published_repo(repo_id)
    hf_repo = repo_id if row.fmt.endswith("-hf") else row.twin
    hf_dir = write_metadata_and_tokenizer(tmp_path / "hf", hf_repo)
    state = _meta_state(hf_dir)
    dtype = DTYPES[read_json(hf_dir / "config.json")["torch_dtype"]]
    if row.fmt == "llava-hf":
        tensors = {legacy_key(k, clip_tower=True): v for k, v in state.items()}
    elif row.fmt == "internvl-hf":
        tensors = {legacy_key(k, clip_tower=False): v for k, v in state.items()}
    elif row.fmt == "llava-original":
        tensors = _original_llava_tensors(state, AutoConfig.from_pretrained(hf_dir))
    else:
        tensors = _original_internvl_tensors(state)
    return {k: (tuple(v.shape), torch.float32 if k.endswith("inv_freq") else dtype) for k, v in tensors.items()}


def clip_tensors(tmp_path) -> dict[str, tuple[int, ...]]:
    directory = write_metadata_and_tokenizer(tmp_path / "clip", CLIP_REPO)
    with torch.device("meta"):
        state = dict(CLIPModel(AutoConfig.from_pretrained(directory)).state_dict())
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # transformers 4.2x saved the position-id buffers too
    return shapes | {f"{t}.embeddings.position_ids": (1, shapes[f"{t}.embeddings.position_embedding.weight"][0]) for t in ("text_model", "vision_model")}


def hooked_config_and_plan(repo_id: str, tmp_path, shapes: dict, clip: dict | None):
    """The loader's own config mapping and conversion plan, from the repository's published files."""
    directory = write_metadata_and_tokenizer(tmp_path / "repo", repo_id)
    raw, keys, fmt = read_json(directory / "config.json"), list(shapes), published_repo(repo_id).fmt
    if fmt == "llava-hf":
        cfg = llava.config_from_llava_hf(AutoConfig.from_pretrained(directory), keys, torch.bfloat16)
        return cfg, llava.plan_llava_hf(keys, cfg.vision.n_layers)
    if fmt == "llava-original":
        clip_config = AutoConfig.from_pretrained(tmp_path / "clip")
        cfg = llava.config_from_llava_original(raw, clip_config, keys, torch.bfloat16)
        return cfg, llava.plan_llava_original(keys, list(clip), cfg.vision.n_layers)
    if fmt == "internvl-hf":
        cfg = internvl.config_from_internvl_hf(AutoConfig.from_pretrained(directory), keys, torch.bfloat16)
        return cfg, internvl.plan_internvl_hf(keys, cfg.vision.n_layers)

    class Shapes:  # the plan of an original checkpoint reads the fused qkv's row count
        def keys(self):
            return keys

        def shape(self, key):
            return shapes[key]

    cfg = internvl.config_from_internvl_original(raw, keys, load_tokenizer(directory), torch.bfloat16)
    return cfg, internvl.plan_internvl_original(Shapes(), cfg.vision.n_layers)


@pytest.mark.parametrize("repo_id", list(PUBLISHED))
def test_full_size_config_builds_on_meta_with_every_key_and_shape_of_its_checkpoint(repo_id, tmp_path):
    row = published_repo(repo_id)
    tensors = published_tensors(repo_id, tmp_path)
    if row.index is not None:  # the published weight index, where it was found
        assert len(tensors) == row.index.n_keys and key_fingerprint(tensors) == row.index.key_fingerprint
        total_bytes = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in tensors.values())
        assert total_bytes == row.index.total_size
        if row.index.total_parameters is not None:
            assert sum(torch.Size(shape).numel() for shape, _ in tensors.values()) == row.index.total_parameters
    if row.parameters is not None:
        assert sum(torch.Size(shape).numel() for shape, _ in tensors.values()) == row.parameters
    shapes = {k: shape for k, (shape, _) in tensors.items()}
    clip = clip_tensors(tmp_path) if row.fmt == "llava-original" else None
    cfg, plan = hooked_config_and_plan(repo_id, tmp_path, shapes, clip)
    with torch.device("meta"):
        model = HookedVLM(cfg)
    check_plan(plan, model, {"main": shapes, "clip": clip or {}})  # every key claimed, every shape equal
    assert not cfg.tie_word_embeddings  # every published checkpoint stores its own LM head
    filled = {a.target for a in plan.assignments}
    assert filled == {name for name, _ in model.named_parameters()}
    expected_ignored = 0 if row.fmt.startswith("internvl") else 16 + 2  # CLIP's last block and post-norm, unread
    vision_ignored = [k for k in plan.ignored if "vision" in k and "position_ids" not in k and "inv_freq" not in k]
    assert len(vision_ignored) == expected_ignored, vision_ignored
