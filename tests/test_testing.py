"""Specification of `hooked_vlm.testing`: tiny offline checkpoints that HF loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
)

from hooked_vlm.testing import (
    INTERNVL_SPECIAL_TOKENS,
    build_internvl_tokenizer,
    build_llava_tokenizer,
    build_tiny_internvl,
    build_tiny_llava,
    load_hf_processor,
    randomize_weights_,
    real_config,
    real_config_names,
)

TRICKY_TEXT = "Zürich, 1999: [0.12, 0.5] {x}\n\tdone — ok? 😀 <box>[[1, 2, 3, 4]]</box>"
QUESTION = "Where is the cat?"
LAYOUTS = ("saved", "legacy", "runtime")


def _model_class(model_type: str) -> type:
    return LlavaForConditionalGeneration if model_type == "llava" else InternVLForConditionalGeneration


def _load(model_dir: Path):
    """HF model (eager attention) plus its loading report."""
    cls = _model_class(_config(model_dir)["model_type"])
    return cls.from_pretrained(model_dir, attn_implementation="eager", output_loading_info=True)


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _assert_clean(info: dict) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def _chat_inputs(processor, images: list) -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=prompt, return_tensors="pt")


def _tiles(width: int, height: int, tile: int, min_patches: int, max_patches: int) -> int:
    """Reference InternVL dynamic tiling (ARCHITECTURES §2.5): tiles plus a thumbnail if > 1 tile."""
    sides = range(1, max_patches + 1)
    grids = [(c, r) for c in sides for r in sides if min_patches <= c * r <= max_patches]
    grids.sort(key=lambda grid: grid[0] * grid[1])  # stable: HF's order among equal tile counts
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * tile * tile * cols * rows):
            best, best_diff = (cols, rows), diff
    n = best[0] * best[1]
    return n + (n > 1)


# ------------------------------------------------------------------------------- tokenizers


def test_llava_tokenizer_has_llama_specials_then_image_and_pad():
    tokenizer = build_llava_tokenizer(vocab_size=500)
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    assert ids == [0, 1, 2, 500, 501]
    assert len(tokenizer) == 502
    assert tokenizer("hello").input_ids[0] == 1  # BOS added like Llama


def test_internvl_tokenizer_places_specials_after_base_vocab_and_adds_no_bos():
    tokenizer = build_internvl_tokenizer(vocab_size=600)
    ids = tokenizer.convert_tokens_to_ids(list(INTERNVL_SPECIAL_TOKENS))
    assert ids == list(range(600, 600 + len(INTERNVL_SPECIAL_TOKENS)))
    assert tokenizer.context_image_token == "<IMG_CONTEXT>" and tokenizer.video_token == "<video>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("hello").input_ids[0] != tokenizer.pad_token_id


@pytest.mark.parametrize("build", [build_llava_tokenizer, build_internvl_tokenizer])
def test_tokenizers_encode_any_text_losslessly(build):
    tokenizer = build()
    ids = tokenizer(TRICKY_TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == TRICKY_TEXT
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None


@pytest.mark.parametrize("build", [build_llava_tokenizer, build_internvl_tokenizer])
def test_tokenizers_are_deterministic(build):
    assert build().get_vocab() == build().get_vocab()


# ------------------------------------------------------------------------------ random init


def test_randomize_weights_is_deterministic_and_not_hf_default(tmp_path):
    a = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "a", seed=7))
    b = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "b", seed=7))
    c = randomize_weights_(LlavaForConditionalGeneration(a.config), seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    assert a.model.language_model.layers[0].self_attn.q_proj.weight.std() > 0.2
    assert (a.model.language_model.norm.weight - 1).abs().mean() > 0.05  # norms are 1 ± noise


def test_same_arguments_write_identical_files(tmp_path):
    for name in ("a", "b"):
        build_tiny_internvl(tmp_path / name, seed=5, key_layout="legacy")
    for file in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


@pytest.mark.parametrize("build", [build_tiny_llava, build_tiny_internvl])
def test_dtype_argument_sets_the_stored_dtype(tmp_path, build):
    model_dir = build(tmp_path / "bf16", dtype=torch.bfloat16)
    assert _config(model_dir)["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(model_dir / "model.safetensors").values()} == {torch.bfloat16}
    assert _model_class(_config(model_dir)["model_type"]).from_pretrained(model_dir, dtype="auto").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ LLaVA


def test_llava_loads_with_no_missing_or_unexpected_keys(llava_dir):
    _, info = _load(llava_dir)
    _assert_clean(info)


def test_llava_embedding_rows_are_padded_to_a_multiple_of_64(llava_dir):
    model, _ = _load(llava_dir)
    rows = model.model.language_model.embed_tokens.weight.shape[0]
    assert rows % 64 == 0 and rows >= model.config.image_token_index + 2
    assert model.lm_head.weight.shape[0] == rows


def test_llava_chat_template_renders_the_llava_hf_prompt(llava_dir):
    processor = AutoProcessor.from_pretrained(llava_dir)
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"


def test_llava_processor_emits_one_token_per_patch(llava_dir, photos):
    processor = AutoProcessor.from_pretrained(llava_dir)
    config = _config(llava_dir)
    grid = config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]
    per_image = grid * grid + (config["vision_feature_select_strategy"] == "full")
    inputs = _chat_inputs(processor, [photos["coffee_wide"], photos["grace_hopper_tall"]])
    assert (inputs["input_ids"] == config["image_token_index"]).sum() == 2 * per_image
    assert inputs["input_ids"][0, 0] == 1  # BOS
    assert inputs["pixel_values"].shape[-1] == config["vision_config"]["image_size"]


def test_llava_forward_is_not_degenerate_and_greedy_generate_runs(llava_dir, photos):
    model, _ = _load(llava_dir)
    inputs = _chat_inputs(AutoProcessor.from_pretrained(llava_dir), [photos["astronaut"]])
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert logits.std(dim=0).mean() > 0.5  # logits vary across positions
    assert logits.std(dim=-1).mean() > 0.5  # and are far from flat over the vocabulary
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


# --------------------------------------------------------------------------------- InternVL


def test_internvl_loads_with_no_missing_or_unexpected_keys(internvl_dir):
    _, info = _load(internvl_dir)
    _assert_clean(info)


def test_internvl_lm_head_is_tied_only_when_asked(internvl_dir):
    model, _ = _load(internvl_dir)
    embed, head = model.model.language_model.embed_tokens.weight, model.lm_head.weight
    if _config(internvl_dir)["tie_word_embeddings"]:
        assert head.data_ptr() == embed.data_ptr()
    else:
        assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)


def test_internvl_embedding_has_more_rows_than_the_tokenizer(internvl_dir):
    model, _ = _load(internvl_dir)
    rows = model.model.language_model.embed_tokens.weight.shape[0]
    assert rows > len(AutoTokenizer.from_pretrained(internvl_dir))


def test_internvl_vision_variant_sets_norms_biases_and_random_lambdas(internvl_dir):
    model, _ = _load(internvl_dir)
    layer = model.model.vision_tower.encoder.layer[0]
    is_6b = model.config.vision_config.norm_type == "rms_norm"
    assert (layer.attention.q_proj.bias is None) == is_6b
    assert hasattr(layer.attention.q_norm, "weight") == is_6b
    assert layer.lambda_1.std() > 0.05 and not torch.allclose(layer.lambda_1, torch.full_like(layer.lambda_1, 0.1))


def test_internvl_chat_template_renders_the_internvl_hf_prompt(internvl_dir):
    processor = load_hf_processor(internvl_dir)
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "coffee_wide", "grace_hopper_tall"])
def test_internvl_processor_emits_tokens_per_tile_times_tiles(internvl_dir, photos, photo):
    processor = load_hf_processor(internvl_dir)
    preprocessor = json.loads((internvl_dir / "preprocessor_config.json").read_text())
    tile = preprocessor["size"]["height"]
    image = photos[photo]
    n_patches = _tiles(*image.size, tile, preprocessor["min_patches"], preprocessor["max_patches"])
    inputs = _chat_inputs(processor, [image])
    per_tile = _config(internvl_dir)["image_seq_length"]
    assert inputs["pixel_values"].shape == (n_patches, 3, tile, tile)
    assert (inputs["input_ids"] == processor.image_token_id).sum() == per_tile * n_patches


def test_internvl_tiling_reference_matches_a_worked_example():
    assert _tiles(480, 320, 56, 1, 6) == 7  # 3x2 grid + thumbnail
    assert _tiles(56, 56, 56, 1, 6) == 1  # one tile, no thumbnail


def test_internvl_forward_is_not_degenerate_and_greedy_generate_runs(internvl_dir, photos):
    model, _ = _load(internvl_dir)
    inputs = _chat_inputs(load_hf_processor(internvl_dir), [photos["chelsea"]])
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert logits.std(dim=0).mean() > 0.5
    assert logits.std(dim=-1).mean() > 0.5
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


# ------------------------------------------------------------------------------ key layouts


def _keys(model_dir: Path) -> set[str]:
    return set(load_file(model_dir / "model.safetensors"))


@pytest.mark.parametrize("build", [build_tiny_llava, build_tiny_internvl])
def test_every_key_layout_loads_in_hf_to_identical_weights(tmp_path, build):
    dirs = {layout: build(tmp_path / layout, seed=3, key_layout=layout) for layout in LAYOUTS}
    models = {}
    for layout, model_dir in dirs.items():
        models[layout], info = _load(model_dir)
        _assert_clean(info)
    reference = models["saved"].state_dict()
    for layout in ("legacy", "runtime"):
        state = models[layout].state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout


def test_llava_key_layouts_use_the_documented_prefixes(tmp_path):
    saved, legacy, runtime = (_keys(build_tiny_llava(tmp_path / layout, key_layout=layout)) for layout in LAYOUTS)
    # transformers 5.23 writes the legacy LLaVA names but drops CLIP's `vision_model.` prefix.
    assert "language_model.lm_head.weight" in saved and "vision_tower.pre_layrnorm.weight" in saved
    assert "vision_tower.vision_model.pre_layrnorm.weight" in legacy
    assert "language_model.model.norm.weight" in legacy and "multi_modal_projector.linear_1.weight" in legacy
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in runtime)
    assert "model.vision_tower.pre_layrnorm.weight" in runtime


def test_internvl_saved_layout_is_the_legacy_layout(tmp_path):
    saved, legacy = (_keys(build_tiny_internvl(tmp_path / layout, key_layout=layout)) for layout in LAYOUTS[:2])
    assert saved == legacy
    assert "vision_tower.embeddings.cls_token" in saved and "language_model.lm_head.weight" in saved


# ------------------------------------------------------------------------- original formats


def test_llava_original_has_two_bin_shards_an_index_and_mm_projector(llava_original_dir):
    index = json.loads((llava_original_dir / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    tensors = {}
    for shard in shards:
        tensors |= torch.load(llava_original_dir / shard, weights_only=True)
    assert set(tensors) == set(index["weight_map"])
    projector = torch.load(llava_original_dir / "mm_projector.bin", weights_only=True)
    assert set(projector) == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert all(torch.equal(projector[k], tensors[k]) for k in projector)
    assert any(k.endswith("rotary_emb.inv_freq") and v.dtype == torch.float32 for k, v in tensors.items())


def test_llava_original_matches_the_hf_weights_with_base_vocab_rows(llava_original_dir, tiny_checkpoint):
    hf, _ = _load(tiny_checkpoint("llava_base"))
    config = _config(llava_original_dir)
    base = hf.config.image_token_index
    assert config["vocab_size"] == base and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_vision_select_layer"] == hf.config.vision_feature_layer
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_feature"] == "patch"
    index = json.loads((llava_original_dir / "pytorch_model.bin.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors |= torch.load(llava_original_dir / shard, weights_only=True)
    lm = hf.model.language_model
    assert torch.equal(tensors["model.embed_tokens.weight"], lm.embed_tokens.weight[:base])
    assert torch.equal(tensors["lm_head.weight"], hf.lm_head.weight[:base])
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], lm.layers[1].mlp.down_proj.weight)
    assert torch.equal(tensors["model.mm_projector.2.bias"], hf.model.multi_modal_projector.linear_2.bias)


def test_llava_original_tokenizer_is_the_base_vocabulary(llava_original_dir, tiny_checkpoint):
    original = AutoTokenizer.from_pretrained(llava_original_dir)
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint("llava_base"))
    assert len(original) == _config(llava_original_dir)["vocab_size"]
    assert "<image>" not in original.get_vocab()
    assert original(TRICKY_TEXT).input_ids == hf(TRICKY_TEXT).input_ids


def test_llava_original_clip_tower_loads_in_hf_with_vision_model_keys(llava_original_dir, tiny_checkpoint):
    clip_dir = Path(_config(llava_original_dir)["mm_vision_tower"])
    assert all(k.startswith("vision_model.") for k in _keys(clip_dir))
    tower, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True)
    _assert_clean(info)
    hf, _ = _load(tiny_checkpoint("llava_base"))
    reference = hf.model.vision_tower.state_dict()
    assert tower.state_dict().keys() == reference.keys()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in tower.state_dict().items())
    assert AutoProcessor.from_pretrained(clip_dir).crop_size["height"] == hf.config.vision_config.image_size


def test_internvl_original_fuses_qkv_and_renames_to_internvl_chat(internvl_original_dir, tiny_checkpoint):
    hf, _ = _load(tiny_checkpoint("internvl_6b"))
    index = json.loads((internvl_original_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors |= load_file(internvl_original_dir / shard)
    assert set(tensors) == set(index["weight_map"]) and len(set(index["weight_map"].values())) == 2
    attention = hf.model.vision_tower.encoder.layer[1].attention
    expected_qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(tensors["vision_model.encoder.layers.1.attn.qkv.weight"], expected_qkv)
    assert "vision_model.encoder.layers.1.attn.qkv.bias" not in tensors  # 6B: no qkv bias
    assert torch.equal(tensors["vision_model.encoder.layers.1.attn.q_norm.weight"], attention.q_norm.weight)
    vision_layers = hf.model.vision_tower.encoder.layer
    assert torch.equal(tensors["vision_model.encoder.layers.0.ls2"], vision_layers[0].lambda_2)
    assert torch.equal(tensors["mlp1.3.weight"], hf.model.multi_modal_projector.linear_2.weight)
    assert torch.equal(tensors["language_model.lm_head.weight"], hf.lm_head.weight)
    prefixes = ("vision_model.embeddings.", "vision_model.encoder.layers.", "mlp1.", "language_model.model.")
    assert all(k.startswith(prefixes) or k == "language_model.lm_head.weight" for k in tensors)


def test_internvl_original_config_uses_the_original_field_names(internvl_original_dir, tiny_checkpoint):
    config = _config(internvl_original_dir)
    hf = _config(tiny_checkpoint("internvl_6b"))
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert (config["ps_version"], config["template"], config["downsample_ratio"]) == ("v2", "internvl2_5", 0.5)
    assert config["force_image_size"] == hf["vision_config"]["image_size"][0]
    vision = config["vision_config"]
    assert (vision["qkv_bias"], vision["qk_normalization"], vision["norm_type"]) == (False, True, "rms_norm")
    assert config["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert config["llm_config"]["head_dim"] == hf["text_config"]["head_dim"]


# ------------------------------------------------------------------------------ real configs


@pytest.mark.parametrize(
    ("name", "total", "vision", "projector"),
    [
        ("llava-1.5-7b", 7_063_427_072, 303_507_456, 20_979_712),
        ("internvl3.5-1b", 1_060_897_792, 304_012_288, 5_253_120),  # ARCHITECTURES §2.4 totals
    ],
)
def test_real_configs_have_the_published_parameter_counts(name, total, vision, projector):
    config = real_config(name)
    with torch.device("meta"):
        model = _model_class(config.model_type)(config)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == vision
    assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) == projector


@pytest.mark.parametrize("name", real_config_names())
def test_real_configs_build_on_the_meta_device(name):
    config = real_config(name)
    with torch.device("meta"):
        model = _model_class(config.model_type)(config)
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight  # untied everywhere
    assert model.config.text_config.vocab_size in (32064, 151936)


def test_internvl38b_uses_the_6b_tower_and_a_12800_wide_projector():
    config = real_config("internvl3.5-38b")
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (3200, 45)
    assert config.vision_config.use_qk_norm and config.vision_config.norm_type == "rms_norm"
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    assert model.model.multi_modal_projector.linear_1.weight.shape == (5120, 12800)
