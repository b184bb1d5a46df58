"""InternVL-3.5: config mapping, dynamic tiling and layout, prompt template.

An image becomes a grid of `cols x rows` tiles (the whole image resized to `(cols·T) x (rows·T)`
and cut row-major; T = the tower's input size, 448 for the real models) plus, when there is more
than one tile, a thumbnail (the whole image squashed to `T x T`). Each view yields
`(T / patch · downsample_ratio)²` tokens (256 for the real models) after pixel shuffle. The grid
is chosen by Hugging Face's `GotOcr2ImageProcessor` with `crop_to_patches=True`, as
InternVLProcessor forces it (pitfall 12); its tie rule and tile limits are what the checkpoint
was trained with, so we reuse it rather than re-derive it.

Prompt (InternVL-HF chat template, no system prompt):
    <|im_start|>user\\n<IMG_CONTEXT>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
and the one `<IMG_CONTEXT>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens per view · views) + `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.image_processing_utils import get_size_dict

from hooked_vlm.config import HookedVLMConfig, TransformerConfig
from hooked_vlm.families.common import (
    as_image_prompt_lists,
    assemble_inputs,
    normalise_feature_layers,
    text_config_from_hf,
    warn_assumed_preprocessing,
)
from hooked_vlm.inputs import ViewGeometry, VLMInput

IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"  # tokenizer.context_image_token: the token the features replace
IMAGE_START, IMAGE_END = "<img>", "</img>"
OLD_PLACEHOLDER = "<image>"  # 4.5x processor configs and the original `model.chat()`
# The original remote-code `model.chat()` (conversation template "internvl2_5") system prompt
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
Template = Literal["hf", "internvl2_5"]
# ImageNet statistics: InternVL's `build_transform` and the -HF preprocessor configs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InternVLPreprocessing:
    """How the checkpoint expects its images and prompts. `tile_size` is the tower's input size."""

    tile_size: int
    patch_size: int
    downsample_ratio: float
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    template: Template = "hf"
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    resample: int = 3  # bicubic
    rescale_factor: float = 1 / 255

    @property
    def view_grid(self) -> int:
        """Tokens per side of one view after pixel shuffle (16 for 448-px tiles)."""
        return round(self.tile_size / self.patch_size * self.downsample_ratio)

    @property
    def tokens_per_view(self) -> int:
        return self.view_grid**2

    @property
    def token_px(self) -> float:
        """View pixels per token side: a token merges 1/ratio x 1/ratio patches (28 px)."""
        return self.patch_size / self.downsample_ratio

    @classmethod
    def from_processor_config(
        cls, config: dict | None, tile_size: int, patch_size: int, downsample_ratio: float, **kwargs: Any
    ) -> InternVLPreprocessing:
        """Read the relevant fields of a `preprocessor_config.json` (GotOcr2ImageProcessor; `size` a
        dict or an integer). `crop_to_patches` is ignored: InternVLProcessor forces it on (pitfall 12).
        No config: the InternVL-HF defaults, with a warning."""
        if config is None:
            warn_assumed_preprocessing(
                "InternVL", f"{tile_size}x{tile_size} tiles, 1 to 12 tiles plus a thumbnail, bicubic, rescale 1/255, "
                f"normalise with ImageNet's mean {list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}"
            )
            config = {}
        size = get_size_dict(config.get("size") or tile_size, param_name="size")
        if size.get("height") != tile_size or size.get("width") != tile_size:
            raise ValueError(f"the image processor produces {config.get('size')} tiles but the vision tower takes {tile_size}px")
        return cls(
            tile_size=tile_size,
            patch_size=patch_size,
            downsample_ratio=downsample_ratio,
            min_tiles=int(config.get("min_patches", 1)),
            max_tiles=int(config.get("max_patches", 12)),
            image_mean=tuple(config.get("image_mean", IMAGENET_MEAN)),
            image_std=tuple(config.get("image_std", IMAGENET_STD)),
            resample=int(config.get("resample", 3)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            **kwargs,
        )


# ---------------------------------------------------------------------------------- config
def square_side(value: int | Sequence[int], name: str) -> int:
    """HF stores InternViT's image/patch size as (h, w); the hooked tower takes squares."""
    if isinstance(value, int):
        return value
    h, w = value
    if h != w:
        raise NotImplementedError(f"non-square vision {name} {tuple(value)} is not supported")
    return int(h)


def vision_config_from_internvit(
    hf: Any, n_layers: int, dtype: torch.dtype, qk_norm_eps: float = 1e-6
) -> TransformerConfig:
    """InternViT's config (HF `InternVLVisionConfig`); `n_layers` = the blocks actually run.

    300M: LayerNorm, q/k/v bias. 6B: RMSNorm, no q/k/v bias, q/k RMSNorm over the full width
    before the head split (pitfall 3; HF hard-codes its eps to 1e-6). Both: a bias on the patch
    conv and the output projection, layer scale, softmax in the activation dtype (pitfall 6)."""
    if hf.norm_type not in ("layer_norm", "rms_norm"):
        raise NotImplementedError(f"InternViT norm_type {hf.norm_type!r} is not supported (layer_norm, rms_norm)")
    if not getattr(hf, "use_absolute_position_embeddings", True):
        raise NotImplementedError("InternViT without absolute position embeddings is not supported")
    if not getattr(hf, "use_mean_pooling", True):
        # then HF applies a final LayerNorm to last_hidden_state, which InternVL-3.5 does not have
        raise NotImplementedError("InternViT with use_mean_pooling=False (a final LayerNorm) is not supported")
    return TransformerConfig(
        n_layers=n_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=hf.hidden_size // hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        normalization_type="LN" if hf.norm_type == "layer_norm" else "RMS",
        eps=hf.layer_norm_eps,
        attn_bias=bool(hf.attention_bias),
        attn_out_bias=True,
        mlp_bias=True,
        qk_norm="full" if hf.use_qk_norm else None,
        qk_norm_eps=qk_norm_eps,
        positional_embedding_type="learned",
        softmax_in_fp32=False,
        layer_scale=True,
        image_size=square_side(hf.image_size, "image_size"),
        patch_size=square_side(hf.patch_size, "patch_size"),
        n_channels=hf.num_channels,
        patch_bias=True,
        ln_pre=False,
        dtype=dtype,
    )


def hooked_config(
    text: Any,
    vision: Any,
    *,
    image_token_id: int,
    vision_feature_layer: int = -1,
    feature_select_strategy: str = "default",
    downsample_ratio: float = 0.5,
    projector_act_fn: str = "gelu",
    tie_word_embeddings: bool = False,
    checkpoint_format: str = "internvl-hf",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    vision_qk_norm_eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> HookedVLMConfig:
    """The hooked config from Hugging Face's text (Qwen3) and vision (InternViT) config objects."""
    if not isinstance(vision_feature_layer, int):
        # HF's get_image_features indexes hidden_states with it: a list cannot work there
        raise NotImplementedError(f"InternVL reads a single vision layer; got vision_feature_layer={vision_feature_layer}")
    if feature_select_strategy != "default":
        # "full" would keep CLS: 1 + grid² tokens cannot be pixel-shuffled (HF fails the same way)
        raise NotImplementedError(
            f"InternVL needs vision_feature_select_strategy 'default', got {feature_select_strategy!r}"
        )
    if round(1 / downsample_ratio) * downsample_ratio != 1:
        raise NotImplementedError(f"downsample_ratio must be 1/k for an integer k, got {downsample_ratio}")
    feature_layers = normalise_feature_layers(vision_feature_layer, vision.num_hidden_layers)
    vision_cfg = vision_config_from_internvit(vision, max(feature_layers), dtype, vision_qk_norm_eps)
    if vision_cfg.n_grid % round(1 / downsample_ratio):
        grid = vision_cfg.n_grid
        raise ValueError(f"a {grid}x{grid} patch grid cannot be pixel-shuffled by {downsample_ratio}")
    return HookedVLMConfig(
        family="internvl",
        vision=vision_cfg,
        text=text_config_from_hf(text, dtype),
        image_token_id=image_token_id,
        feature_layers=feature_layers,
        vision_n_layers_checkpoint=vision.num_hidden_layers,
        feature_select_strategy="default",
        projector_act_fn=projector_act_fn,
        projector_bias=True,
        downsample_ratio=downsample_ratio,
        projector_ln_eps=1e-5,  # nn.LayerNorm's default, not the ViT's 1e-6 (pitfall 2)
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        checkpoint_format=checkpoint_format,
    )


# ---------------------------------------------------------------------------------- prompts
def render_prompt(prompt: str, template: Template = "hf") -> str:
    """The chat template around one user turn with one image, ending with the generation prompt."""
    for placeholder in (IMAGE_PLACEHOLDER, OLD_PLACEHOLDER):
        if placeholder in prompt:
            raise ValueError(
                f"the prompt contains {placeholder!r}; the template places the image itself "
                f"(pass raw=True to give the full text with one {IMAGE_PLACEHOLDER!r} yourself)"
            )
    turn = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if template == "hf":  # InternVL-HF chat_template: no system prompt
        return turn
    if template == "internvl2_5":  # the original remote-code model.chat()
        return f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n{turn}"
    raise ValueError(f"unknown InternVL template {template!r} (expected 'hf' or 'internvl2_5')")


def check_placeholder(text: str) -> None:
    """A text given verbatim must hold exactly one `<IMG_CONTEXT>` (one image per prompt)."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count == 1:
        return
    if count == 0 and OLD_PLACEHOLDER in text:
        raise ValueError(
            f"the text contains {OLD_PLACEHOLDER!r}, the placeholder of older InternVL processors and of the "
            f"original model.chat(); InternVL-HF expects {IMAGE_PLACEHOLDER!r} (exactly one per prompt), which "
            f"becomes {IMAGE_START}{IMAGE_PLACEHOLDER}...{IMAGE_END}"
        )
    raise ValueError(f"the text must contain exactly one {IMAGE_PLACEHOLDER!r} (one image per prompt), found {count}")


def tokenize(tokenizer: Any, text: str, n_image_tokens: int, image_token_id: int) -> list[int]:
    """Token ids with the placeholder expanded as InternVLProcessor does: the whole expanded string
    is tokenised at once (Qwen's tokenizer adds no BOS)."""
    check_placeholder(text)
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
        raise ValueError(f"the tokenizer does not map {IMAGE_PLACEHOLDER!r} to the image token id {image_token_id}")
    expansion = IMAGE_START + IMAGE_PLACEHOLDER * n_image_tokens + IMAGE_END
    return tokenizer(text.replace(IMAGE_PLACEHOLDER, expansion)).input_ids


# ---------------------------------------------------------------------------------- images
@lru_cache(maxsize=16)
def image_processor(pre: InternVLPreprocessing) -> Any:
    """Hugging Face's PIL-backend GotOcr2 processor (pitfall 10: the PIL path is the original's)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": pre.tile_size, "width": pre.tile_size},
        crop_to_patches=True,
        min_patches=pre.min_tiles,
        max_patches=pre.max_tiles,
        image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
        resample=pre.resample,
        rescale_factor=pre.rescale_factor,
    )


def tile_grid(image_size: tuple[int, int], pre: InternVLPreprocessing, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of the tile grid, by Hugging Face's own rule (closest aspect ratio; on a tie
    the grid with more tiles while the image area exceeds half the tiles' area). An image that
    would like more tiles than `max_tiles` gets the best grid within the limit."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    if max_tiles <= 1:  # GotOcr2 only tiles when max_patches > 1; else a plain resize (= 1x1)
        return 1, 1
    width, height = image_size
    tile = (pre.tile_size, pre.tile_size)
    return get_optimal_tiled_canvas((height, width), tile, min_tiles, max_tiles)


def view_geometries(
    image_size: tuple[int, int], pre: InternVLPreprocessing, grid: tuple[int, int]
) -> list[ViewGeometry]:
    """Tiles row-major (tile k at column k % cols, row k // cols), then the thumbnail. Tiles
    are local views and the thumbnail the global one; a single tile is global.

    A tile sees the image resized to `(cols·T) x (rows·T)`, so one view pixel is
    `W / (cols·T)` x `H / (rows·T)` original pixels, offset by the tile's corner; the thumbnail
    squashes the whole image to `T x T` (`W / T` x `H / T`)."""
    width, height = image_size
    cols, rows = grid
    n, t = pre.view_grid, pre.tile_size
    sx, sy = width / (cols * t), height / (rows * t)
    # A lone tile sees the whole image, so it is the image's global view (there is no thumbnail)
    whole = cols * rows == 1
    views = [
        ViewGeometry(f"tile_{k}", n, n, pre.token_px, sx, sx * (k % cols) * t, sy, sy * (k // cols) * t, whole)
        for k in range(cols * rows)
    ]
    if cols * rows > 1 and pre.use_thumbnail:
        views.append(ViewGeometry("thumbnail", n, n, pre.token_px, width / t, 0.0, height / t, 0.0, True))
    return views


def preprocess_images(
    images: list, pre: InternVLPreprocessing, min_tiles: int, max_tiles: int
) -> tuple[Float[Tensor, "view channel height width"], list[list[ViewGeometry]]]:
    """Pixel values of every view of every image, in order, and each image's views."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    out = image_processor(pre)(
        images, crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles, return_tensors="pt"
    )
    pixel_values = torch.as_tensor(out["pixel_values"])
    chunks = list(torch.split(pixel_values, [int(n) for n in out["num_patches"]]))
    views = []
    for i, image in enumerate(images):
        geometry = view_geometries(image.size, pre, tile_grid(image.size, pre, min_tiles, max_tiles))
        tiles = sum(v.name.startswith("tile_") for v in geometry)
        if not pre.use_thumbnail and tiles > 1:  # GotOcr2 always appends it; the original can opt out
            chunks[i] = chunks[i][:tiles]
        if len(chunks[i]) != len(geometry):
            raise RuntimeError(f"image {i}: the processor made {len(chunks[i])} views, the layout expects {len(geometry)}")
        views.append(geometry)
    return torch.cat(chunks), views


# ---------------------------------------------------------------------------------- prepare
def prepare(
    model: Any,
    images: Any,
    prompts: str | Sequence[str],
    *,
    raw: bool = False,
    min_tiles: int | None = None,
    max_tiles: int | None = None,
    template: Template | None = None,
    answers: str | Sequence[str] | None = None,
) -> VLMInput:
    """Images + user prompts -> `VLMInput` (see `HookedVLM.prepare`). `min_tiles`/`max_tiles`
    override the checkpoint's tiling limits (the paper caps InternVL at 6 tiles). With `answers`,
    each answer and the end-of-turn token follow the prompt (teacher forcing; `answer_mask`)."""
    cfg: HookedVLMConfig = model.cfg
    pre: InternVLPreprocessing = model.preprocessing
    images, prompts = as_image_prompt_lists(images, prompts)
    texts = list(prompts) if raw else [render_prompt(p, template or pre.template) for p in prompts]
    for text in texts:
        check_placeholder(text)  # before the (slower) image processing

    pixel_values, views = preprocess_images(
        images, pre, pre.min_tiles if min_tiles is None else min_tiles, pre.max_tiles if max_tiles is None else max_tiles
    )
    sequences = [
        tokenize(model.tokenizer, text, pre.tokens_per_view * len(image_views), cfg.image_token_id)
        for text, image_views in zip(texts, views)
    ]
    # an assistant turn renders as "<|im_start|>assistant\n{answer}<|im_end|>"; InternVLProcessor pads on the left
    return assemble_inputs(model, images, texts, sequences, pixel_values, views, answers=answers, answer_end="<|im_end|>")
