"""Tiny LLaVA-1.5 checkpoints: llava-hf format, and the original liuhaotian export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    ProcessorMixin,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from hooked_vlm.testing.common import (
    BICUBIC,
    CLIP_MEAN,
    CLIP_STD,
    KeyLayout,
    apply_key_layout,
    _rename_checkpoint_keys,
    _round_up,
    _save_model,
    _save_sharded,
    _update_json,
    load_runtime_state_dict,
    randomize_weights_,
)
from hooked_vlm.testing.tokenizers import LLAVA_CHAT_TEMPLATE, build_llava_tokenizer

# ------------------------------------------------------------------------------------- LLaVA


def tiny_llava_config(
    *,
    vocab_size: int,
    d_model: int = 64,
    d_mlp: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    vision_d_model: int = 32,
    vision_d_mlp: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 2,
    image_size: int = 42,
    patch_size: int = 14,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    max_position_embeddings: int = 2048,
) -> LlavaConfig:
    """A LlavaConfig with llava-1.5's structure (quick_gelu CLIP, eps 1e-5, default RoPE θ=1e4) at
    tiny sizes. `vocab_size` is the *base* vocabulary: `<image>` = vocab_size, `<pad>` = +1, and
    the embedding has `vocab_size + 2` rows padded to a multiple of 64, like llava-hf's 32064."""
    grid = image_size // patch_size
    vision = CLIPVisionConfig(
        hidden_size=vision_d_model,
        intermediate_size=vision_d_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_d_model,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        vocab_size=_round_up(vocab_size + 2, 64),
        rms_norm_eps=1e-5,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab_size + 1,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab_size,
        pad_token_id=vocab_size + 1,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=grid * grid + (vision_feature_select_strategy == "full"),
        tie_word_embeddings=False,
    )


def llava_processor(tokenizer: LlamaTokenizer, config: LlavaConfig, *, pad: bool = False) -> LlavaProcessor:
    """llava-hf's processor scaled to the tiny image size: resize the shortest edge, center-crop;
    with `pad`, first expand to a square with the mean colour (`LlavaImageProcessor(do_pad=True)`,
    what the library calls the "pad" image mode of original LLaVA-1.5)."""
    size = config.vision_config.image_size
    common = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    image_processor = LlavaImageProcessorPil(do_pad=True, **common) if pad else CLIPImageProcessorPil(**common)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


# Llama tokenizer configs state these; without them 5.x reports add_bos_token=False on reload
# (BOS is still added, by the post-processor stored in tokenizer.json).
_LLAMA_TOKENIZER_FIELDS = {"add_bos_token": True, "add_eos_token": False}


def _save_processor(processor: ProcessorMixin, path: Path, tokenizer_fields: dict | None = None) -> None:
    """`save_pretrained`, plus a standalone preprocessor_config.json as hub repos have (5.x nests
    the image processor inside processor_config.json only)."""
    processor.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    if tokenizer_fields:
        _update_json(path / "tokenizer_config.json", **tokenizer_fields)


def build_tiny_llava(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 500,
    dtype: torch.dtype = torch.float32,
    key_layout: KeyLayout = "saved",
    init_gain: float = 2.0,
    **sizes: Any,
) -> Path:
    """Write a random `LlavaForConditionalGeneration` checkpoint with its LlavaProcessor, tokenizer
    and chat template to `path`, loadable with `from_pretrained` / `AutoProcessor.from_pretrained`.
    `sizes`: keyword arguments of `tiny_llava_config` (widths, layers, heads, image and patch size,
    feature layer and strategy). Each image becomes (image_size // patch_size)² `<image>` tokens
    (+1 with strategy "full")."""
    path = Path(path)
    config = tiny_llava_config(vocab_size=vocab_size, **sizes)
    model = randomize_weights_(LlavaForConditionalGeneration(config), seed=seed, gain=init_gain)
    _save_model(model, path, dtype)
    apply_key_layout(path, key_layout, clip_tower=True)
    _save_processor(llava_processor(build_llava_tokenizer(vocab_size), config), path, _LLAMA_TOKENIZER_FIELDS)
    return path


def _llama_base_tokenizer(hf_dir: Path, base_vocab_size: int) -> LlamaTokenizer:
    """The llava-hf tokenizer without the appended `<image>`/`<pad>`: original LLaVA's tokenizer."""
    backend = json.loads((hf_dir / "tokenizer.json").read_text())["model"]
    vocab = {piece: i for piece, i in backend["vocab"].items() if i < base_vocab_size}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in backend["merges"]]
    # Original LLaVA training pads with <unk>.
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, pad_token="<unk>")


def _original_llava_config(config: LlavaConfig, clip_dir: Path) -> dict:
    text, vision = config.text_config, config.vision_config
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("original LLaVA selects a single vision layer (mm_vision_select_layer)")
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "initializer_range": 0.02,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(config.dtype or torch.float32).removeprefix("torch."),
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": config.image_token_index,  # base vocabulary: no <image>, no <pad>
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch" if config.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_tower": str(clip_dir.resolve()),
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def _original_llava_tensors(state: dict[str, torch.Tensor], config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Runtime-named LM + projector -> original names; vocab rows cut back to the base vocabulary,
    plus the fp32 `rotary_emb.inv_freq` buffers that 4.31-era Llama checkpoints carried."""
    base = config.image_token_index
    out = {}
    for key, tensor in state.items():
        if key.startswith("model.language_model."):
            out[key.replace("model.language_model.", "model.", 1)] = tensor
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key.split("linear_")[1][0]]
            out[f"model.mm_projector.{index}.{key.rsplit('.', 1)[1]}"] = tensor
        elif key == "lm_head.weight":
            out[key] = tensor
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:base]
    out["lm_head.weight"] = out["lm_head.weight"][:base]
    text = config.text_config
    d_head = text.hidden_size // text.num_attention_heads
    theta = text.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    for i in range(text.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def _save_clip_tower(state: dict[str, torch.Tensor], config: LlavaConfig, clip_dir: Path) -> None:
    """The CLIP tower as a standalone repo like openai/clip-vit-large-patch14-336: `vision_model.*`
    keys (5.23 would save them without the prefix) and a CLIPImageProcessor config."""
    tower = CLIPVisionModel(config.vision_config)
    prefix = "model.vision_tower."
    tower.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    tower.to(config.dtype or torch.float32).save_pretrained(clip_dir)
    _rename_checkpoint_keys(clip_dir, lambda key: "vision_model." + key.removeprefix("vision_model."))
    size = config.vision_config.image_size
    CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=BICUBIC,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(clip_dir)  # fmt: skip


def export_llava_original(hf_dir: str | Path, out_dir: str | Path, clip_dir: str | Path) -> Path:
    """Write the weights of an HF LLaVA checkpoint (`build_tiny_llava` output, any key layout) in
    the original `liuhaotian/llava-v1.5-*` format: LM + projector in two `pytorch_model-*.bin`
    shards with an index, `mm_projector.bin`, base-vocab tokenizer, and the CLIP tower in
    `clip_dir` (referenced by absolute path from `mm_vision_tower`)."""
    hf_dir, out_dir, clip_dir = Path(hf_dir), Path(out_dir), Path(clip_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlavaConfig.from_pretrained(hf_dir)
    state = load_runtime_state_dict(hf_dir)
    _save_clip_tower(state, config, clip_dir)
    tensors = _original_llava_tensors(state, config)
    n_layers = config.text_config.num_hidden_layers
    first = [k for k in tensors if k == "model.embed_tokens.weight" or _layer_index(k) < n_layers // 2]
    _save_sharded(tensors, [first, [k for k in tensors if k not in first]], out_dir, fmt="bin")
    projector = {k: v.clone() for k, v in tensors.items() if k.startswith("model.mm_projector.")}
    torch.save(projector, out_dir / "mm_projector.bin")
    (out_dir / "config.json").write_text(json.dumps(_original_llava_config(config, clip_dir), indent=2) + "\n")
    _llama_base_tokenizer(hf_dir, config.image_token_index).save_pretrained(out_dir)
    _update_json(out_dir / "tokenizer_config.json", **_LLAMA_TOKENIZER_FIELDS)
    return out_dir


def _layer_index(key: str) -> int:
    """Decoder layer number of a `model.layers.{i}.*` key; a large number for anything else."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else 1 << 30
