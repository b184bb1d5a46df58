"""The Hugging Face side of the intervention tests: the eager reference model, run on
`inputs_embeds` edited by hand or with attention masks written by hand — independent of
`hooked_vlm.interventions`."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from hooked_vlm.inputs import VLMInput, position_ids_from_mask
from hooked_vlm.model import causal_mask
from hooked_vlm.parity import load_reference
from weights_conversion.io import read_json


def load_hf(path: Path):
    return load_reference(path, read_json(path / "config.json"), torch.float32, "cpu")


@torch.no_grad()
def hf_inputs_embeds(hf, inputs: VLMInput) -> torch.Tensor:
    """Hugging Face's own merged embeddings (hidden_states[0])."""
    out = hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
             position_ids=inputs.position_ids, output_hidden_states=True)  # fmt: skip
    return out.hidden_states[0]


@torch.no_grad()
def hf_logits(hf, inputs: VLMInput, *, inputs_embeds=None, attention_mask=None) -> torch.Tensor:
    """Logits from `inputs_embeds` (no pixels) or from the inputs; `attention_mask` may be a
    custom 4D additive mask, which transformers 5.23 uses as given (`masking_utils`)."""
    mask = inputs.attention_mask if attention_mask is None else attention_mask
    if inputs_embeds is not None:
        return hf(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=inputs.position_ids).logits
    return hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=mask, position_ids=inputs.position_ids).logits


def additive_mask(inputs: VLMInput, blocked: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal + padding mask `[batch, 1, q, k]` (or `[batch, head, q, k]` for a
    per-head `blocked`), with `blocked` (query, key) pairs also set to the dtype's minimum."""
    base = causal_mask(inputs.attention_mask, inputs.input_ids.shape[1], torch.float32)
    return base.masked_fill(blocked, torch.finfo(torch.float32).min)


def lm_attention_modules(hf) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in hf.model.language_model.layers]


def vision_attention_modules(hf) -> list[torch.nn.Module]:
    encoder = hf.model.vision_tower.encoder
    return [layer.self_attn for layer in encoder.layers] if hasattr(encoder, "layers") else [layer.attention for layer in encoder.layer]


@contextlib.contextmanager
def attention_masks(modules: dict[torch.nn.Module, torch.Tensor]):
    """Hand each attention module its own additive mask (through its `attention_mask` kwarg)."""

    def inject(mask):
        def hook(module, args, kwargs):
            return args, kwargs | {"attention_mask": mask}

        return hook

    handles = [module.register_forward_pre_hook(inject(mask), with_kwargs=True) for module, mask in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def extend(inputs: VLMInput, ids: torch.Tensor, mask: torch.Tensor) -> VLMInput:
    return replace(inputs, input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))


@torch.no_grad()
def generate_without_cache(model, inputs: VLMInput, steps: int, fwd_hooks) -> torch.Tensor:
    """Greedy decoding by full forwards over the growing sequence (no KV cache), hooks attached."""
    ids, mask, tokens = inputs.input_ids, inputs.attention_mask, []
    for _ in range(steps):
        logits = model.run_with_hooks(extend(inputs, ids, mask), fwd_hooks=list(fwd_hooks))
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


def assert_same_generation(cached: torch.Tensor, manual: torch.Tensor, eos: tuple[int, ...]) -> None:
    """Token-identical up to (and including) each row's first end-of-sequence token."""
    for row_cached, row_manual in zip(cached.tolist(), manual.tolist()):
        stop = next((i + 1 for i, t in enumerate(row_manual) if t in eos), len(row_manual))
        assert row_cached[:stop] == row_manual[:stop]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> float:
    """Within `rel` of the expected tensor's scale; returns the relative difference."""
    scale = max(expected.abs().max().item(), 1.0)
    diff = (actual - expected).abs().max().item() / scale
    assert diff <= rel, f"max difference {diff:.3g} of scale {scale:.3g}"
    return diff
