"""Tiny random Hugging Face checkpoints, built offline and deterministically.

The test suite, the benchmarks and users who want to try the library without downloading
gigabytes all need real checkpoint *directories* that `transformers` loads like a hub model:
config, weights, tokenizer, processor and chat template. Everything here is built from nothing:
the tokenizers are BPE models trained on a small built-in English corpus, the weights are random.
Given the same arguments (and seed) every file is reproduced exactly.

What you get:

- `build_tiny_llava` / `build_tiny_internvl`: `LlavaForConditionalGeneration` (CLIP + Llama) and
  `InternVLForConditionalGeneration` (InternViT-300M or -6B style + Qwen3) directories.
- `export_llava_original` / `export_internvl_original`: the same weights in the original
  `liuhaotian/llava-v1.5-*` and remote-code `InternVLChatModel` formats.
- `real_config`: the full-size HF configs (no weights), to build models on the meta device.
- `load_hf_processor`: `AutoProcessor`, with a fallback for InternVL when torchvision is missing.

Key layouts (checked against transformers 5.23). Real llava-hf / InternVL-HF repos were written by
4.x and use the *legacy* names (`language_model.model.*`, `language_model.lm_head.weight`,
`multi_modal_projector.*`, and for LLaVA `vision_tower.vision_model.*`); 5.x renames them at load
time to the *runtime* module names (`model.language_model.*`, `lm_head.weight`,
`model.vision_tower.*`, ...). What 5.23's `save_pretrained` writes depends on where the model came
from: a model loaded from disk is saved back in the layout it was loaded from, while a freshly
constructed model is saved with the legacy llava rules reverted but without CLIP's
`vision_model.` prefix (`vision_tower.embeddings.*`): a hybrid no 4.x release wrote. InternVL's
fresh save is exactly the legacy layout. `key_layout` picks one of these three ("saved" leaves
transformers' output alone); HF loads all of them to identical weights.

Random initialisation: HF's default init (std 0.02) leaves activations tiny and logits nearly flat,
so a wrong residual or a missing scale would go unnoticed. `randomize_weights_` instead draws
matrices with std `gain / sqrt(fan_in)`, norm weights around 1, layer-scale lambdas around 0.5 and
nonzero biases.

transformers 5.23 quirks handled here:
- InternVLProcessor requires a video processor, and InternVL's needs torchvision, so without
  torchvision neither `InternVLProcessor(...)` nor `AutoProcessor.from_pretrained` works, even for
  images. `load_hf_processor` falls back to the same processor without video support.
- Tokenizers built in memory forget `add_bos_token` on reload (BOS is still added by the stored
  post-processor); the Llama tokenizer configs therefore state it, as llava-hf's does.
- A processor's `save_pretrained` nests the image processor config inside processor_config.json;
  a standalone preprocessor_config.json, as hub repos have, is written too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Tokenizer,
    Qwen3Config,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import is_torchvision_available

__all__ = [
    "KeyLayout",
    "LLAVA_CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "INTERNVL_SPECIAL_TOKENS",
    "build_llama_tokenizer",
    "build_llava_tokenizer",
    "build_internvl_tokenizer",
    "randomize_weights_",
    "runtime_key",
    "legacy_key",
    "load_runtime_state_dict",
    "tiny_llava_config",
    "tiny_internvl_config",
    "build_tiny_llava",
    "build_tiny_internvl",
    "export_llava_original",
    "export_internvl_original",
    "load_hf_processor",
    "real_config",
    "real_config_names",
]

KeyLayout = Literal["saved", "legacy", "runtime"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as in both families' preprocessor configs

# --------------------------------------------------------------------------------- tokenizers

_CORPUS = """\
USER: What is in the image? ASSISTANT: A cat is sitting on a red chair next to the window.
Describe the picture in detail. There are two dogs playing with a ball in the park.
Where is the person? Answer with a bounding box [0.12, 0.34, 0.56, 0.78].
Please give the coordinates of the cup: <ref>cup</ref><box>[[120, 340, 560, 780]]</box>
How many birds are there? There are 3 birds on the wire and 12 more in the sky.
The astronaut stands in front of the flag. The rocket launches at 10:45 am!
A woman with glasses is wearing a dark uniform; she smiles at the camera.
Is the coffee hot or cold? The coffee is hot, with foam on top of the cup.
Locate the object in the image and output its box (x1, y1, x2, y2).
What color is the car? The car is blue, the bus is yellow and the truck is white.
The man on the left holds an umbrella, the girl on the right holds a kite.
Count the apples: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 42, 100, 256, 1000 and 3.14 appear.
Is there a dog in this photo? Yes, there is a small brown dog under the table.
Question: which animal is bigger? Answer: the elephant is bigger than the horse.
The kitchen has a white oven, a sink, a fridge and a wooden table with chairs.
A plate of food: rice, chicken, broccoli and a slice of lemon on the side.
The sign says "STOP". The street is wet after the rain, and the lights are on.
Two people are riding bicycles along the river; trees line the path.
The train arrives at the station at night. Passengers wait on the platform.
She is reading a book about science, history and mathematics in the library.
Provide a short caption: a black and white photo of an old building.
The image shows a laptop, a phone, a keyboard and a mouse on the desk.
Answer the question using a single word or phrase. Left or right? Right.
What is the boy doing? He is throwing a frisbee to his friend on the beach.
The clock on the wall reads 7:30. A vase with flowers sits on the shelf.
Let's think step by step: first find the cat, then find the chair, then compare.
{"label": "person", "bbox": [10, 20, 30, 40]} - done. (Note: boxes are 0-1000.)
Output format: <box>[[x1, y1, x2, y2]]</box> where all values are integers.
Sky, grass, water, sand, snow, road, wall, floor, door, roof, tree, cloud, sun, moon.
"""

LLAVA_CHAT_TEMPLATE = (
    # llava-hf/llava-1.5-*-hf chat_template, verbatim.
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

INTERNVL_CHAT_TEMPLATE = (
    # The InternVL-HF conversion script's template (481 bytes, like InternVL3-8B-hf's file).
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is "
    "string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif "
    "content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3's own specials, then what InternVL adds, in id order (as real: 151643 <|endoftext|>, ...).
INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
)  # fmt: skip
_INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def _train_bpe(pre_tokenizer, vocab_size: int, initial_alphabet: list[str]) -> tuple[dict[str, int], list]:
    """Train a BPE model on the built-in corpus; returns (vocab, merges) in training order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=initial_alphabet, show_progress=False)
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_llama_tokenizer(vocab_size: int = 500) -> LlamaTokenizer:
    """A Llama-2 style tokenizer: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte-fallback tokens, then
    BPE pieces with the `▁` word marker. BOS is added automatically; any text encodes (unknown
    characters fall back to bytes). This is the *base* vocabulary, as in vicuna / original LLaVA."""
    n_learned = vocab_size - 3 - 256
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learned, merges = _train_bpe(metaspace, n_learned, initial_alphabet=[])
    if len(learned) != n_learned:
        raise ValueError(f"the built-in corpus yields at most {len(learned) + 259} tokens, not {vocab_size}")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    vocab |= {piece: 259 + i for i, piece in enumerate(learned)}
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)


def build_llava_tokenizer(vocab_size: int = 500) -> LlamaTokenizer:
    """`build_llama_tokenizer` plus what the llava-hf conversion appended: `<image>` (id
    `vocab_size`) and `<pad>` (id `vocab_size + 1`), and the llava-hf chat template."""
    tokenizer = build_llama_tokenizer(vocab_size)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_internvl_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """A Qwen3 / InternVL-3.5 style byte-level BPE tokenizer (no BOS added) with the
    `INTERNVL_SPECIAL_TOKENS` at ids `vocab_size, vocab_size + 1, ...`, the named
    `start_image_token`/`end_image_token`/`context_image_token`/`video_token` attributes that
    InternVLProcessor reads, and the InternVL-HF chat template."""
    byte_level = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = _train_bpe(byte_level, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    if len(vocab) != vocab_size:
        raise ValueError(f"the built-in corpus yields at most {len(vocab)} tokens, not {vocab_size}")
    # Specials placed in the vocab fix their ids; registering them as added tokens below reuses those ids.
    vocab |= {token: vocab_size + i for i, token in enumerate(INTERNVL_SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(_INTERNVL_NAMED_TOKENS),
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_SPECIAL_TOKENS])
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- random weights


def _is_embedding_table(name: str) -> bool:
    return re.search(r"(position_embeddings?|class_embedding|cls_token)(\.weight)?$", name) is not None


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0, gain: float = 2.0) -> torch.nn.Module:
    """Overwrite every parameter with a deterministic draw that keeps activations O(1) and logits
    far from flat: matrices (token embeddings and lm_head included) N(0, gain²/fan_in), position
    and class embeddings N(0, 1), norm weights 1 + N(0, 0.2²), layer-scale lambdas 0.5 + N(0, 0.2²),
    biases N(0, 0.1²). Parameters are visited in name order with one seeded generator, so the
    result depends only on `seed` and the parameter names and shapes; tied parameters are drawn once."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if re.search(r"lambda_\d$", name):
            value = 0.5 + 0.2 * noise
        elif _is_embedding_table(name):
            value = noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif param.ndim == 1:  # LayerNorm / RMSNorm weights (incl. q/k norms)
            value = 1.0 + 0.2 * noise
        else:
            value = noise * (gain / math.sqrt(param[0].numel()))
        param.copy_(value.to(param.dtype))
    return model


# -------------------------------------------------------------------------------- key layouts

_TO_RUNTIME = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
)


def runtime_key(key: str) -> str:
    """Any on-disk Llava/InternVL key (legacy, 5.x-saved or runtime) -> transformers 5.x runtime name."""
    for pattern, replacement in _TO_RUNTIME:
        key = re.sub(pattern, replacement, key)
    return key


def legacy_key(key: str, *, clip_tower: bool) -> str:
    """Runtime name -> the 4.x hub layout (llava-hf, InternVL-HF). Only CLIP towers carry the
    `vision_model.` prefix on disk."""
    vision_prefix = "vision_tower.vision_model." if clip_tower else "vision_tower."
    for pattern, replacement in (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", vision_prefix),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ):
        key = re.sub(pattern, replacement, key)
    return key


def _rename_checkpoint_keys(path: Path, rename: Callable[[str], str]) -> None:
    """Rewrite the tensor names of every safetensors file in `path` (and its index, if sharded)."""
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        save_file({rename(k): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))


def _apply_key_layout(path: Path, key_layout: KeyLayout, *, clip_tower: bool) -> None:
    if key_layout == "runtime":
        _rename_checkpoint_keys(path, runtime_key)
    elif key_layout == "legacy":
        _rename_checkpoint_keys(path, lambda key: legacy_key(runtime_key(key), clip_tower=clip_tower))
    elif key_layout != "saved":
        raise ValueError(f"key_layout must be 'saved', 'legacy' or 'runtime', not {key_layout!r}")


def load_runtime_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF Llava/InternVL checkpoint directory, under their 5.x runtime names,
    whatever the on-disk layout."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    return {runtime_key(key): tensor for file in files for key, tensor in load_file(file).items()}


# -------------------------------------------------------------------------------- file helpers


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _update_json(file: Path, **fields) -> None:
    data = json.loads(file.read_text())
    data.update(fields)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_model(model: PreTrainedModel, path: Path, dtype: torch.dtype) -> None:
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(path)


def _save_sharded(tensors: dict[str, torch.Tensor], shards: list[list[str]], path: Path, fmt: str) -> None:
    """Write `tensors` split as `shards` (lists of keys) in HF's sharded naming, plus the index:
    fmt "bin" -> pytorch_model-0000i-of-0000n.bin, "safetensors" -> model-0000i-of-0000n.safetensors."""
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        filename = f"{stem}-{i:05d}-of-{len(shards):05d}.{fmt}"
        shard = {key: tensors[key].contiguous().clone() for key in keys}  # clone: never save a whole storage
        if fmt == "bin":
            torch.save(shard, path / filename)
        else:
            save_file(shard, path / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, filename)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / f"{stem}.{fmt}.index.json").write_text(json.dumps(index, indent=2) + "\n")


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


def _llava_processor(tokenizer: LlamaTokenizer, config: LlavaConfig) -> LlavaProcessor:
    """llava-hf's processor scaled to the tiny image size: resize shortest edge, center-crop."""
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
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
    dtype: torch.dtype = torch.float32,
    key_layout: KeyLayout = "saved",
    init_gain: float = 2.0,
) -> Path:
    """Write a random `LlavaForConditionalGeneration` checkpoint with its LlavaProcessor, tokenizer
    and chat template to `path`, loadable with `from_pretrained` / `AutoProcessor.from_pretrained`.
    Each image becomes (image_size // patch_size)² `<image>` tokens (+1 with strategy "full")."""
    path = Path(path)
    config = tiny_llava_config(
        vocab_size=vocab_size, d_model=d_model, d_mlp=d_mlp, n_layers=n_layers, n_heads=n_heads,
        vision_d_model=vision_d_model, vision_d_mlp=vision_d_mlp, vision_layers=vision_layers,
        vision_heads=vision_heads, image_size=image_size, patch_size=patch_size,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
    )  # fmt: skip
    model = randomize_weights_(LlavaForConditionalGeneration(config), seed=seed, gain=init_gain)
    _save_model(model, path, dtype)
    _apply_key_layout(path, key_layout, clip_tower=True)
    _save_processor(_llava_processor(build_llava_tokenizer(vocab_size), config), path, _LLAMA_TOKENIZER_FIELDS)
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
) -> InternVLConfig:
    """An InternVLConfig with InternVL-3.5's structure at tiny sizes: InternViT-300M (LayerNorm,
    qkv bias) or -6B (RMSNorm, full-width q/k norm, no qkv bias), eps 1e-6, pixel shuffle 0.5, and
    a Qwen3 LM whose head_dim is independent of d_model / n_heads (θ=1e6, eps 1e-6). Token ids come
    from `tokenizer` (`build_internvl_tokenizer`); the embedding has more rows than it has tokens,
    as real InternVL-3.5 (151936 vs ~151680)."""
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
    text = Qwen3Config(
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


def _internvl_processor(
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
    min_patches: int = 1,
    max_patches: int = 6,
    dtype: torch.dtype = torch.float32,
    key_layout: KeyLayout = "saved",
    init_gain: float = 2.0,
) -> Path:
    """Write a random `InternVLForConditionalGeneration` checkpoint with its InternVLProcessor
    (GotOcr2 image processor), tokenizer and chat template to `path`. `image_size` is the tile
    size: each tile becomes ((image_size // patch_size) // 2)² `<IMG_CONTEXT>` tokens (56 px -> 4).
    Load the processor with `load_hf_processor` if torchvision is not installed."""
    path = Path(path)
    tokenizer = build_internvl_tokenizer(vocab_size)
    config = tiny_internvl_config(
        tokenizer,
        vision_variant=vision_variant, d_model=d_model, d_mlp=d_mlp, n_layers=n_layers, n_heads=n_heads,
        n_key_value_heads=n_key_value_heads, d_head=d_head, tie_word_embeddings=tie_word_embeddings,
        vision_d_model=vision_d_model, vision_d_mlp=vision_d_mlp, vision_layers=vision_layers,
        vision_heads=vision_heads, image_size=image_size, patch_size=patch_size,
    )  # fmt: skip
    model = randomize_weights_(InternVLForConditionalGeneration(config), seed=seed, gain=init_gain)
    _save_model(model, path, dtype)
    _apply_key_layout(path, key_layout, clip_tower=False)
    _save_processor(_internvl_processor(tokenizer, config, min_patches, max_patches), path)
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


def _original_internvl_config(config: InternVLConfig, hf_dir: Path) -> dict:
    vision, text = config.vision_config, config.text_config
    image_processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    dtype = str(config.dtype or torch.float32).removeprefix("torch.")
    llm_config = text.to_dict() | {"architectures": ["Qwen3ForCausalLM"], "torch_dtype": dtype}
    llm_config |= {"rope_theta": text.rope_parameters["rope_theta"], "rope_scaling": None}  # 4.x-era fields
    llm_config.pop("rope_parameters", None)
    llm_config.pop("dtype", None)
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
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


# ------------------------------------------------------------------------------- real configs


def _llava_real(d_model: int, d_mlp: int, n_layers: int, n_heads: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_heads, vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576, tie_word_embeddings=False,
    )  # fmt: skip


def _internvl_real(vision_variant: str, d_model: int, d_mlp: int, n_layers: int, n_heads: int) -> InternVLConfig:
    shared = dict(layer_norm_eps=1e-6, image_size=448, patch_size=14, hidden_act="gelu")
    if vision_variant == "300m":
        vision = InternVLVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            attention_bias=True, use_qk_norm=False, norm_type="layer_norm", **shared,
        )  # fmt: skip
    else:
        vision = InternVLVisionConfig(
            hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
            attention_bias=False, use_qk_norm=True, norm_type="rms_norm", **shared,
        )  # fmt: skip
    text = Qwen3Config(
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=40960,
        use_sliding_window=False, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=151671, image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip


_REAL_CONFIGS: dict[str, Callable[[], PreTrainedConfig]] = {
    "llava-1.5-7b": lambda: _llava_real(4096, 11008, 32, 32),
    "llava-1.5-13b": lambda: _llava_real(5120, 13824, 40, 40),
    "internvl3.5-1b": lambda: _internvl_real("300m", 1024, 3072, 28, 16),
    "internvl3.5-8b": lambda: _internvl_real("300m", 4096, 12288, 36, 32),
    "internvl3.5-38b": lambda: _internvl_real("6b", 5120, 25600, 64, 64),
}


def real_config(name: str) -> PreTrainedConfig:
    """The HF config (no weights) of a full-size checkpoint, with the values of the real
    `config.json` (see ARCHITECTURES.md §1.3 / §2.4). Names: see `real_config_names()`."""
    if name not in _REAL_CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(_REAL_CONFIGS)}")
    return _REAL_CONFIGS[name]()


def real_config_names() -> tuple[str, ...]:
    """The names `real_config` knows."""
    return tuple(_REAL_CONFIGS)
