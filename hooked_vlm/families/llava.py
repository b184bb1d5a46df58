"""LLaVA-1.5: config mapping, image preprocessing and layout, prompt template.

Two checkpoint formats, two image modes:
- llava-hf (`LlavaForConditionalGeneration`): the HF processor resizes the short side to the
  tower's size and centre-crops ("crop"); chat template `USER: <image>\\n{prompt} ASSISTANT:`.
- original (`liuhaotian/llava-v1.5-*`): pads to a square with the mean colour first ("pad") and
  uses the vicuna_v1 system prompt, tokenising the text around the image chunk by chunk.
Either image mode can be chosen for either format (`prepare(..., image_mode=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

import torch
from transformers.image_processing_utils import get_size_dict
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from hooked_vlm.config import HookedVLMConfig, TransformerConfig
from hooked_vlm.families.common import (
    as_image_prompt_lists,
    assemble_inputs,
    normalise_feature_layers,
    text_config_from_hf,
    warn_assumed_preprocessing,
)
from hooked_vlm.inputs import ViewGeometry, VLMInput

IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ImageMode = Literal["pad", "crop"]
Template = Literal["hf", "vicuna_v1"]


@dataclass(frozen=True)
class LlavaPreprocessing:
    """How the checkpoint expects its images and prompts."""

    image_size: int
    patch_size: int
    image_mode: ImageMode = "crop"
    template: Template = "hf"
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)
    resample: int = 3  # bicubic
    rescale_factor: float = 1 / 255

    @classmethod
    def from_processor_config(cls, config: dict | None, image_size: int, patch_size: int, **kwargs: Any):
        """Read the relevant fields of a `preprocessor_config.json` (CLIPImageProcessor). `size` and
        `crop_size` may be dicts or, as in openai/clip-vit-large-patch14-336's file, plain integers
        (transformers' `get_size_dict` reads both). No config: CLIP's defaults, with a warning."""
        if config is None:
            warn_assumed_preprocessing(
                "LLaVA", f"resize the shortest edge to {image_size} px, centre-crop {image_size}x{image_size}, bicubic, "
                f"rescale 1/255, normalise with CLIP's mean {OPENAI_CLIP_MEAN} and std {OPENAI_CLIP_STD}"
            )
            config = {}
        for field in ("crop_size", "size"):
            if config.get(field) is None:
                continue
            size = get_size_dict(config[field], default_to_square=field == "crop_size", param_name=field)
            side = size.get("height") or size.get("shortest_edge")
            if side != image_size or size.get("width", side) != side:
                raise ValueError(f"the image processor's {field} is {config[field]} but the vision tower takes {image_size}px images")
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            image_mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            resample=int(config.get("resample", 3)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            **kwargs,
        )


# ---------------------------------------------------------------------------------- config
def vision_config_from_clip(hf: Any, n_layers: int, dtype: torch.dtype) -> TransformerConfig:
    """CLIP's vision config; `n_layers` = the blocks LLaVA actually runs."""
    return TransformerConfig(
        n_layers=n_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=hf.hidden_size // hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        normalization_type="LN",
        eps=hf.layer_norm_eps,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        positional_embedding_type="learned",
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        n_channels=hf.num_channels,
        patch_bias=False,
        ln_pre=True,
        dtype=dtype,
    )


def hooked_config(
    text: Any,
    vision: Any,
    *,
    image_token_id: int,
    vision_feature_layer: int | Sequence[int] = -2,
    feature_select_strategy: str = "default",
    projector_act_fn: str = "gelu",
    projector_bias: bool = True,
    tie_word_embeddings: bool = False,
    checkpoint_format: str = "llava-hf",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedVLMConfig:
    """The hooked config from Hugging Face's text (Llama) and vision (CLIP) config objects."""
    feature_layers = normalise_feature_layers(vision_feature_layer, vision.num_hidden_layers)
    if feature_select_strategy not in ("default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy {feature_select_strategy!r}")
    return HookedVLMConfig(
        family="llava",
        vision=vision_config_from_clip(vision, max(feature_layers), dtype),
        text=text_config_from_hf(text, dtype),
        image_token_id=image_token_id,
        feature_layers=feature_layers,
        vision_n_layers_checkpoint=vision.num_hidden_layers,
        feature_select_strategy=feature_select_strategy,
        projector_act_fn=projector_act_fn,
        projector_bias=projector_bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        checkpoint_format=checkpoint_format,
    )


# ---------------------------------------------------------------------------------- prompts
def render_prompt(prompt: str, template: Template) -> str:
    """The chat template around one user turn with one image, ending with the generation prompt."""
    if IMAGE_PLACEHOLDER in prompt:
        raise ValueError(
            f"the prompt already contains {IMAGE_PLACEHOLDER!r}; the template places the image itself "
            "(pass raw=True to give the full text with the placeholder yourself)"
        )
    turn = f"USER: {IMAGE_PLACEHOLDER}\n{prompt} ASSISTANT:"
    if template == "hf":  # llava-hf chat_template: no system prompt
        return turn
    if template == "vicuna_v1":  # original LLaVA-1.5 eval (conv_vicuna_v1, sep " ")
        return f"{VICUNA_V1_SYSTEM} {turn}"
    raise ValueError(f"unknown LLaVA template {template!r} (expected 'hf' or 'vicuna_v1')")


def tokenize(tokenizer: Any, text: str, n_image_tokens: int, image_token_id: int, template: Template) -> list[int]:
    """Token ids with the placeholder expanded to `n_image_tokens` image tokens.

    "hf": the whole string with the placeholder repeated is tokenised at once (LlavaProcessor).
    "vicuna_v1": each chunk around the placeholder is tokenised on its own and later chunks lose
    their BOS (LLaVA's `tokenizer_image_token`); ids next to the image can differ from "hf"."""
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the text must contain exactly one {IMAGE_PLACEHOLDER!r}, found {text.count(IMAGE_PLACEHOLDER)}")
    if template == "hf":
        if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
            raise ValueError(f"the tokenizer does not map {IMAGE_PLACEHOLDER!r} to the image token id {image_token_id}")
        return tokenizer(text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * n_image_tokens)).input_ids
    before, after = (tokenizer(chunk).input_ids for chunk in text.split(IMAGE_PLACEHOLDER))
    if tokenizer.bos_token_id is not None and after[:1] == [tokenizer.bos_token_id]:
        after = after[1:]
    return before + [image_token_id] * n_image_tokens + after


# ---------------------------------------------------------------------------------- images
@lru_cache(maxsize=16)
def image_processor(pre: LlavaPreprocessing, mode: ImageMode) -> Any:
    """Hugging Face's PIL-backend processor for the mode: `CLIPImageProcessorPil` for "crop" (what
    llava-hf's processor does), `LlavaImageProcessorPil(do_pad=True)` for "pad" (expand to a square
    with the `int(255 * mean)` colour, centred, then resize: original LLaVA-1.5)."""
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    kwargs = dict(
        size={"shortest_edge": pre.image_size},
        crop_size={"height": pre.image_size, "width": pre.image_size},
        image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
        resample=pre.resample,
        rescale_factor=pre.rescale_factor,
    )
    if mode == "crop":
        return CLIPImageProcessorPil(**kwargs)
    if mode == "pad":
        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    raise ValueError(f"unknown LLaVA image mode {mode!r} (expected 'pad' or 'crop')")


def view_geometry(image_size: tuple[int, int], pre: LlavaPreprocessing, mode: ImageMode, has_cls: bool) -> ViewGeometry:
    """Where each of the grid's tokens falls in the original image, for one image."""
    width, height = image_size
    n = pre.image_size
    grid = n // pre.patch_size
    if mode == "pad":
        side = max(width, height)
        # pad_to_square centres the image at offset (side - short) // 2, then resizes side -> n
        off_x = (side - width) // 2 if height > width else 0
        off_y = (side - height) // 2 if width > height else 0
        sx = sy = side / n
        return ViewGeometry("grid", grid, grid, pre.patch_size, sx, -off_x, sy, -off_y, True, has_cls)
    # crop: short side -> n, long side -> int(n * long / short), then centre crop n x n
    if width <= height:
        new_w, new_h = n, int(n * height / width)
    else:
        new_w, new_h = int(n * width / height), n
    left, top = (new_w - n) // 2, (new_h - n) // 2
    sx, sy = width / new_w, height / new_h
    return ViewGeometry("grid", grid, grid, pre.patch_size, sx, left * sx, sy, top * sy, True, has_cls)


# ---------------------------------------------------------------------------------- prepare
def prepare(
    model: Any,
    images: Any,
    prompts: str | Sequence[str],
    *,
    raw: bool = False,
    image_mode: ImageMode | None = None,
    template: Template | None = None,
    answers: str | Sequence[str] | None = None,
) -> VLMInput:
    """Images + user prompts -> `VLMInput` (see `HookedVLM.prepare`). With `answers`, each
    answer and the end-of-sequence token follow the prompt (teacher forcing; `answer_mask`)."""
    cfg: HookedVLMConfig = model.cfg
    pre: LlavaPreprocessing = model.preprocessing
    mode = image_mode or pre.image_mode
    template = template or pre.template
    images, prompts = as_image_prompt_lists(images, prompts)
    texts = list(prompts) if raw else [render_prompt(p, template) for p in prompts]

    has_cls = cfg.feature_select_strategy == "full"
    n_tokens = (pre.image_size // pre.patch_size) ** 2 + has_cls
    sequences = [tokenize(model.tokenizer, t, n_tokens, cfg.image_token_id, template) for t in texts]
    pixel_values = torch.as_tensor(image_processor(pre, mode)(images, return_tensors="pt")["pixel_values"])
    views = [[view_geometry(image.size, pre, mode, has_cls)] for image in images]
    # an assistant turn renders as "ASSISTANT: {answer}</s>" in llava-hf's template
    return assemble_inputs(model, images, texts, sequences, pixel_values, views, answers=answers,
                           answer_separator=" ", answer_end=model.tokenizer.eos_token or "")  # fmt: skip
