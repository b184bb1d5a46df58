"""Tiny InternVL-3.5 checkpoints: -HF format, and the original InternVLChatModel export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    ProcessorMixin,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.utils import is_torchvision_available

from hooked_vlm.testing.common import (
    BICUBIC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KeyLayout,
    apply_key_layout,
    _round_up,
    _save_model,
    _save_sharded,
    _update_json,
    load_runtime_state_dict,
    randomize_weights_,
)
from hooked_vlm.testing.llava import _save_processor
from hooked_vlm.testing.tokenizers import INTERNVL_CHAT_TEMPLATE, build_internvl_tokenizer

# ------------------------------------------------------------------------------------ InternVL


def tiny_internvl_config(
    tokenizer: Qwen2Tokenizer,
    *,
    vision_variant: Literal["300m", "6b"] = "300m",
    d_model: int = 48,
    d_mlp: int = 96,
    n_layers: int = 2,
    n_heads: int = 4,
    n_key_value_heads: int = 2,
    d_head: int = 16,
    tie_word_embeddings: bool = False,
    vision_d_model: int = 32,
    vision_d_mlp: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 56,
    patch_size: int = 14,
    max_position_embeddings: int = 4096,
    num_experts: int = 0,
    experts_per_token: int = 2,
    d_mlp_expert: int = 32,
    norm_topk_prob: bool = True,
    mlp_only_layers: tuple[int, ...] = (),
) -> InternVLConfig:
    """An InternVLConfig with InternVL-3.5's structure at tiny sizes: InternViT-300M (LayerNorm,
    qkv bias) or -6B (RMSNorm, full-width q/k norm, no qkv bias), eps 1e-6, pixel shuffle 0.5, and
    a Qwen3 LM whose head_dim is independent of d_model / n_heads (θ=1e6, eps 1e-6). Token ids come
    from `tokenizer` (`build_internvl_tokenizer`); the embedding has more rows than it has tokens,
    as real InternVL-3.5 (151936 vs ~151680).

    `num_experts` > 0 makes the LM a Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B): every MLP but
    those of `mlp_only_layers` (`d_mlp` wide) routes each token to `experts_per_token` experts of
    width `d_mlp_expert`."""
    if vision_variant not in ("300m", "6b"):
        raise ValueError(f"vision_variant must be '300m' or '6b', not {vision_variant!r}")
    is_6b = vision_variant == "6b"
    vision = InternVLVisionConfig(
        hidden_size=vision_d_model,
        intermediate_size=vision_d_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        norm_type="rms_norm" if is_6b else "layer_norm",
        attention_bias=not is_6b,
        use_qk_norm=is_6b,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    moe = dict(
        num_experts=num_experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=d_mlp_expert,
        norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=1,
    )  # fmt: skip
    text = (Qwen3MoeConfig if num_experts else Qwen3Config)(
        **(moe if num_experts else {}),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_key_value_heads,
        head_dim=d_head,
        vocab_size=_round_up(len(tokenizer) + 1, 64),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as Qwen3
        eos_token_id=tokenizer.eos_token_id,  # <|im_end|>
        pad_token_id=tokenizer.pad_token_id,
    )
    grid = image_size // patch_size
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(grid // 2) ** 2,  # pixel shuffle with ratio 0.5 merges 2x2 patches
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )


class _InternVLProcessorWithoutVideo(InternVLProcessor):
    """InternVLProcessor minus its video processor, which in transformers 5.x requires torchvision
    (so does `AutoProcessor` for InternVL, even for images). Images and text behave identically."""

    # ProcessorMixin reads the sub-processor list from this signature, so video is never required.
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)


def internvl_processor(
    tokenizer: Qwen2Tokenizer, config: InternVLConfig, min_patches: int, max_patches: int
) -> InternVLProcessor:
    """The InternVL-HF processor for the tiny tile size (GotOcr2 tiling, ImageNet mean/std)."""
    tile = config.vision_config.image_size[0]
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=False,  # as saved on the hub; InternVLProcessor forces True at call time
        min_patches=min_patches,
        max_patches=max_patches,
        resample=BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    return _InternVLProcessorWithoutVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def build_tiny_internvl(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 600,
    min_patches: int = 1,
    max_patches: int = 6,
    dtype: torch.dtype = torch.float32,
    key_layout: KeyLayout = "saved",
    init_gain: float = 2.0,
    **sizes: Any,
) -> Path:
    """Write a random `InternVLForConditionalGeneration` checkpoint with its InternVLProcessor
    (GotOcr2 image processor), tokenizer and chat template to `path`. `sizes`: keyword arguments
    of `tiny_internvl_config` (tower variant, widths, layers, heads, GQA, tying, tile and patch
    size). `image_size` is the tile size: each tile becomes ((image_size // patch_size) // 2)²
    `<IMG_CONTEXT>` tokens (56 px -> 4). Load the processor with `load_hf_processor` if
    torchvision is not installed."""
    path = Path(path)
    tokenizer = build_internvl_tokenizer(vocab_size)
    config = tiny_internvl_config(tokenizer, **sizes)
    model = randomize_weights_(InternVLForConditionalGeneration(config), seed=seed, gain=init_gain)
    _save_model(model, path, dtype)
    apply_key_layout(path, key_layout, clip_tower=False)
    _save_processor(internvl_processor(tokenizer, config, min_patches, max_patches), path)
    for name in ("processor_config.json", "tokenizer_config.json"):
        _update_json(path / name, processor_class="InternVLProcessor")
    return path


def load_hf_processor(path: str | Path) -> ProcessorMixin:
    """`AutoProcessor.from_pretrained(path)`; for InternVL without torchvision (where AutoProcessor
    cannot build the required video processor) an InternVLProcessor without video support."""
    config_file = Path(path) / "config.json"
    is_internvl = config_file.exists() and json.loads(config_file.read_text()).get("model_type") == "internvl"
    if is_internvl and not is_torchvision_available():
        return _InternVLProcessorWithoutVideo.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


_ORIGINAL_VISION_NAMES = (
    (r"^model\.vision_tower\.", "vision_model."),
    (r"\.cls_token$", ".class_embedding"),
    (r"\.position_embeddings$", ".position_embedding"),
    (r"\.patch_embeddings\.projection\.", ".patch_embedding."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
)
_ORIGINAL_OTHER_NAMES = (
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)


def _original_internvl_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runtime names -> InternVLChatModel names; separate q/k/v fused into `attn.qkv` (rows q|k|v)."""
    out = {}
    for key, tensor in state.items():
        rules = _ORIGINAL_VISION_NAMES if key.startswith("model.vision_tower.") else _ORIGINAL_OTHER_NAMES
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    for key in [k for k in out if re.search(r"\.attn\.q_proj\.(weight|bias)$", k)]:
        parts = [out.pop(key.replace(".q_proj.", f".{name}_proj.")) for name in "qkv"]
        out[key.replace(".q_proj.", ".qkv.")] = torch.cat(parts, dim=0)
    return out


# The remote code an original InternVL config.json names
INTERNVL_CHAT_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}


def _original_internvl_config(config: InternVLConfig, hf_dir: Path) -> dict:
    vision, text = config.vision_config, config.text_config
    image_processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    dtype = str(config.dtype or torch.float32).removeprefix("torch.")
    architecture = "Qwen3MoeForCausalLM" if text.model_type == "qwen3_moe" else "Qwen3ForCausalLM"
    llm_config = text.to_dict() | {"architectures": [architecture], "torch_dtype": dtype}
    llm_config |= {"rope_theta": text.rope_parameters["rope_theta"], "rope_scaling": None}  # 4.x-era fields
    llm_config.pop("rope_parameters", None)
    llm_config.pop("dtype", None)
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": dict(INTERNVL_CHAT_AUTO_MAP),
        "model_type": "internvl_chat",
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": vision.image_size[0],
        "min_dynamic_patch": image_processor["min_patches"],
        "max_dynamic_patch": image_processor["max_patches"],
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": config.vision_feature_layer,
        "template": "internvl2_5",
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": dtype,
        "llm_config": llm_config,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_channels": vision.num_channels,
            "image_size": vision.image_size[0],
            "patch_size": vision.patch_size[0],
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 0.1,
            "use_flash_attn": False,
            "torch_dtype": dtype,
        },
    }


def export_internvl_original(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the weights of an HF InternVL checkpoint (`build_tiny_internvl` output, any key
    layout) in the original remote-code `InternVLChatModel` format: `internvl_chat` config with
    `vision_config` / `llm_config`, two safetensors shards (vision + mlp1, then the LM) with an
    index, and the tokenizer. The tied lm_head of a tied model is not stored, as HF does."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = InternVLConfig.from_pretrained(hf_dir)
    tensors = _original_internvl_tensors(load_runtime_state_dict(hf_dir))
    vision = [k for k in tensors if not k.startswith("language_model.")]
    _save_sharded(tensors, [vision, [k for k in tensors if k not in vision]], out_dir, fmt="safetensors")
    (out_dir / "config.json").write_text(json.dumps(_original_internvl_config(config, hf_dir), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(hf_dir / name, out_dir / name)
    return out_dir
