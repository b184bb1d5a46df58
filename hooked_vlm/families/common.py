"""Pieces both families share: the language-model config mapping and input checks."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from hooked_vlm.config import TransformerConfig
from hooked_vlm.inputs import ImageLayout, ViewGeometry, VLMInput, position_ids_from_mask


def text_config_from_hf(hf: Any, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """A Llama, Qwen3 or Qwen3-MoE text config (transformers 5.x object) in TransformerLens terms."""
    model_type = getattr(hf, "model_type", "")
    if model_type == "gpt_oss":
        raise NotImplementedError(
            "language model type 'gpt_oss' (InternVL3_5-GPT-OSS-20B-A4B-Preview) is not supported: its attention "
            "sinks, alternating sliding-window attention and biased, clamped-SwiGLU experts are not implemented"
        )
    if model_type not in ("llama", "qwen3", "qwen3_moe"):
        raise NotImplementedError(f"language model type {model_type!r} is not supported (llama, qwen3, qwen3_moe)")
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only the default RoPE)")
    if getattr(hf, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention is not supported")
    n_heads = hf.num_attention_heads
    fields = dict(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=n_heads,
        n_key_value_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        d_head=getattr(hf, "head_dim", None) or hf.hidden_size // n_heads,
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        attn_bias=bool(getattr(hf, "attention_bias", False)),
        attn_out_bias=bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm="head" if model_type in ("qwen3", "qwen3_moe") else None,
        qk_norm_eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        causal=True,
        d_vocab=hf.vocab_size,
        dtype=dtype,
    )
    if model_type == "qwen3_moe":
        fields |= _qwen3_moe_fields(hf)
    return TransformerConfig(**fields)


def _qwen3_moe_fields(hf: Any) -> dict:
    """Qwen3-MoE's experts. A layer is dense when listed in `mlp_only_layers` or off the
    `decoder_sparse_step` grid (`(layer + 1) % step`), as `Qwen3MoeDecoderLayer` decides; its MLP
    is `intermediate_size` wide, every expert `moe_intermediate_size`."""
    step = hf.decoder_sparse_step
    if hf.num_experts <= 0 or step <= 0:  # HF's rule makes every layer dense then: not a MoE model
        raise NotImplementedError(f"a qwen3_moe config without experts (num_experts {hf.num_experts}, sparse step {step})")
    only = set(hf.mlp_only_layers or [])
    dense = tuple(l for l in range(hf.num_hidden_layers) if l in only or (l + 1) % step)
    return dict(
        d_mlp=hf.moe_intermediate_size,
        num_experts=hf.num_experts,
        experts_per_token=hf.num_experts_per_tok,
        norm_topk_prob=bool(hf.norm_topk_prob),
        dense_mlp_layers=dense,
        d_mlp_dense=hf.intermediate_size if dense else None,
    )


def warn_assumed_preprocessing(family: str, defaults: str) -> None:
    """A checkpoint without an image-processor config is loaded with the family's defaults; say
    which, since a fine-tune trained with other settings would then see other pixels."""
    warnings.warn(
        f"the {family} checkpoint has no preprocessor_config.json (nor an image processor in processor_config.json); "
        f"assuming the defaults: {defaults}",
        stacklevel=4,
    )


def normalise_feature_layers(layers: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Hugging Face's `vision_feature_layer` (an index into the tower's hidden-states tuple of
    length n_layers + 1, negative allowed) as non-negative indices."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for k in layers:
        index = k if k >= 0 else n_layers + 1 + k
        if not 0 <= index <= n_layers:
            raise ValueError(f"vision_feature_layer {k} is out of range for a tower of {n_layers} layers")
        out.append(index)
    return tuple(out)


ImageLike = Image.Image | str | Path | np.ndarray | torch.Tensor


def as_image_prompt_lists(images: Any, prompts: Any) -> tuple[list[Image.Image], list[str]]:
    """Accept one image and one prompt, or two lists of equal length; check the types. Images
    may be PIL images, paths or URLs, or uint8 pixel arrays (see `as_pil_image`)."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; one image per prompt is required")
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected str")
    return [as_pil_image(image, i) for i, image in enumerate(images)], prompts


def as_pil_image(image: ImageLike, index: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image, a local path or URL (read by transformers'
    `load_image`, which applies the EXIF orientation), a uint8 numpy array `[height, width]` or
    `[height, width, channels]`, or a uint8 tensor `[channels, height, width]` (torchvision's
    layout), channels being 1, 3 or 4. Transparency is composited onto white, as Hugging Face's
    image processors do."""
    if isinstance(image, Image.Image):
        return _rgb(image)
    if isinstance(image, (str, Path)):
        from transformers.image_utils import load_image

        source = str(image)
        if not source.startswith(("http://", "https://")) and not Path(source).is_file():
            raise FileNotFoundError(f"image {index}: no image file at {source!r}")
        return load_image(source)
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image {index} is an array of {image.dtype}; expected uint8 pixels (0-255)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"image {index} has array shape {image.shape}; expected [H, W] or [H, W, 1|3|4] (tensors: [1|3|4, H, W])")
        return _rgb(Image.fromarray(image))
    raise TypeError(f"image {index} is a {type(image).__name__}; expected a PIL image, a path or URL, or a uint8 array")


def _rgb(image: Image.Image) -> Image.Image:
    """RGB as Hugging Face's image processors make it: transparency composited onto white."""
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (input_ids, attention_mask)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s)
            mask[i, length - len(s) :] = 1
    return ids, mask


def as_answer_list(answers: str | Sequence[str] | None, n: int) -> list[str] | None:
    if answers is None:
        return None
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(answers) != n:
        raise ValueError(f"got {len(answers)} answers for {n} prompts")
    return answers


def answer_token_ids(tokenizer: Any, text: str, answer: str, separator: str, end: str) -> list[int]:
    """The ids of `answer` followed by the end-of-turn token, as they come out when the whole
    conversation is tokenised at once (what the model was trained on), for teacher forcing.
    Raises if appending the answer changes how the prompt itself is tokenised."""
    prompt_ids = tokenizer(text).input_ids
    full_ids = tokenizer(text + separator + answer + end).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"appending the answer {answer!r} changes the tokenisation of the prompt's end")
    return full_ids[len(prompt_ids) :]


def assemble_inputs(
    model: Any,
    images: list[Image.Image],
    texts: list[str],
    sequences: list[list[int]],
    pixel_values: torch.Tensor,
    views: list[list[ViewGeometry]],
    *,
    answers: str | Sequence[str] | None = None,
    answer_separator: str = "",
    answer_end: str = "",
) -> VLMInput:
    """The end every family's `prepare` shares: append the teacher-forced answers (each followed
    by `answer_end`, as the chat template renders an assistant turn), left-pad, find the image
    tokens and build the image-token map from each image's views."""
    cfg = model.cfg
    answers = as_answer_list(answers, len(texts))
    answer_ids: list[list[int]] = [[] for _ in texts]
    if answers is not None:
        answer_ids = [answer_token_ids(model.tokenizer, t, a, answer_separator, answer_end) for t, a in zip(texts, answers)]
        sequences = [s + a for s, a in zip(sequences, answer_ids)]
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    input_ids, attention_mask = left_pad(sequences, pad_id)
    layout = ImageLayout.build(
        image_sizes=[image.size for image in images],
        views=views,
        image_positions=[torch.nonzero(row == cfg.image_token_id).flatten() for row in input_ids],
        image_batch_row=list(range(len(images))),
    )
    return VLMInput(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        pixel_values=pixel_values,
        layout=layout,
        text=texts,
        images=images,
        answer_mask=None if answers is None else answer_mask(attention_mask, [len(a) for a in answer_ids]),
    )


def answer_mask(attention_mask: torch.Tensor, answer_lengths: list[int]) -> torch.Tensor:
    """True at the answer tokens, which end every (left-padded) row."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, n in enumerate(answer_lengths):
        if n:
            mask[row, -n:] = True
    return mask
