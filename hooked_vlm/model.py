"""HookedVLM: vision tower -> projector -> language model, every intermediate hooked.

One image's path, in order (every name is a hook in `model.hook_dict`):

    pixel_values -> vision.hook_patch_embed, vision.hook_pos_embed, vision.hook_embed
      -> (CLIP) vision.ln_pre -> vision.blocks[0..L) -> vision.hook_features
      -> projector(.hook_pixel_shuffle, .ln, .hook_hidden) -> projector.hook_out
    input_ids -> hook_embed ; image features scattered at the image-token positions
      -> hook_inputs_embeds -> blocks[0..L) -> ln_final -> unembed -> logits
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from hooked_vlm.allocator import keep_freed_memory_by_default
from hooked_vlm.cache import VLMActivationCache
from hooked_vlm.components import KVCache, RMSNorm, RotaryEmbedding, TransformerBlock
from hooked_vlm.components.attention import causal_mask, is_plain_causal
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.inputs import VLMInput
from hooked_vlm.prompt_settings import PromptSettings, prepare_kwargs, updated
from hooked_vlm.tl_surface import TransformerLensSurface
from hooked_vlm.towers import Projector, VisionTower

# per-head hooks, [batch, pos, head, d]: their position axis is the third from last (so is a
# per-head q/k norm's `hook_normalized` when it is 4-D, and a MoE MLP's [batch, pos, expert, d_model])
PER_HEAD_HOOKS = frozenset({"hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result", "hook_normalized", "hook_expert_out"})


class Embed(nn.Module):
    """Token embedding. `W_E` is `[d_vocab, d_model]` as in TransformerLens."""

    def __init__(self, d_vocab: int, d_model: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_vocab, d_model, dtype=dtype))

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.weight

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return nn.functional.embedding(tokens, self.weight)


class Unembed(nn.Module):
    """The LM head. Stored as Hugging Face stores it (`[d_vocab, d_model]`); `W_U` is the
    TransformerLens view `[d_model, d_vocab]`."""

    def __init__(self, d_model: int, d_vocab: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_vocab, d_model, dtype=dtype))

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.weight.T

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return nn.functional.linear(x, self.weight)


class HookedVLM(TransformerLensSurface, HookedRootModule):
    """A LLaVA-1.5 or InternVL-3.5 model whose every activation can be cached, patched or knocked out.

    Build one with `HookedVLM.from_pretrained(name_or_path, dtype=..., device=...)`; feed it the
    `VLMInput` that `model.prepare(images, prompts)` returns.
    """

    def __init__(self, cfg: HookedVLMConfig, tokenizer: Any = None, preprocessing: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing  # the family's image/prompt settings (see hooked_vlm.families)
        self.name_or_path: str | None = None  # what `from_pretrained` was given (results record it)
        self.prompt_settings = PromptSettings()  # what `prepare` uses unless told (hooked_vlm.prompt_settings)
        text, vision = cfg.text, cfg.vision
        self.vision = VisionTower(vision, cfg.feature_layers, cfg.feature_select_strategy)
        self.projector = Projector(
            cfg.d_vision_features,
            text.d_model,
            cfg.projector_act_fn,
            cfg.projector_bias,
            text.dtype,
            downsample_ratio=cfg.downsample_ratio,
            ln_eps=cfg.projector_ln_eps,
        )
        self.embed = Embed(text.d_vocab, text.d_model, text.dtype)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: text token embeddings
        self.hook_inputs_embeds = HookPoint()  # [batch, pos, d_model]: after the image features are merged
        self.rotary = RotaryEmbedding(text.d_head, text.rotary_base)
        self.blocks = nn.ModuleList([TransformerBlock(text, layer) for layer in range(text.n_layers)])
        self.ln_final = RMSNorm(text.d_model, text.eps, text.dtype)
        self.unembed = Unembed(text.d_model, text.d_vocab, text.dtype)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self.past_length = 0  # positions already in the KV cache during the current forward
        self.setup()

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        device_map: dict[str, Any] | str | None = None,
        max_memory: dict | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> HookedVLM:
        """Load a checkpoint in any supported format (see `weights_conversion`): a local
        directory, a Hugging Face hub id, or the name of a shipped toy model.

        `dtype`: a torch dtype, its name ("bfloat16", "bf16", ...) or "auto" (the checkpoint's own).
        `device_map` spreads the model over several devices as in transformers: "auto" /
        "balanced" / "balanced_low_0" / "sequential" (computed by accelerate within `max_memory`,
        e.g. `{0: "70GiB", 1: "70GiB"}`), or a dict from module-name prefixes ("vision",
        "blocks.0", "unembed", ...) to devices; activations follow, and the map used is
        `model.hf_device_map`. `revision`, `cache_dir`, `token`, `local_files_only`: as for
        `huggingface_hub.snapshot_download` (a hub id is read from the Hugging Face cache, and
        `HF_HUB_OFFLINE=1` is honoured)."""
        from weights_conversion import HubOptions, load_pretrained

        hub = HubOptions(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        model = load_pretrained(name_or_path, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory, hub=hub)
        model.name_or_path = str(name_or_path)
        return model

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, images: Any, prompts: str | Sequence[str], **kwargs: Any) -> VLMInput:
        """Turn images and prompts into a `VLMInput` the way the checkpoint expects: the family's
        chat template, its image processor, left padding, and the image-token map. One image per
        prompt; an image is a PIL image, a path or URL, or a uint8 array (numpy `[H, W, C]`,
        torch `[C, H, W]`).

        Keyword arguments: `raw=True` passes the text verbatim (it must hold the image
        placeholder); `answers` appends each answer and the end token after the prompt (teacher
        forcing; `inputs.answer_mask` marks them); `template` overrides the chat template.
        LLaVA: `image_mode` ("pad", original LLaVA-1.5, or "crop", llava-hf). InternVL:
        `min_tiles`, `max_tiles` override the checkpoint's tiling limits. A setting not passed is
        taken from `model.prompt_settings` (see `use_settings`)."""
        from hooked_vlm.families import family_module

        family = family_module(self.cfg.family)
        kwargs = prepare_kwargs(self, kwargs)
        accepted = list(inspect.signature(family.prepare).parameters)[3:]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"prepare() for {self.cfg.family} checkpoints takes no {', '.join(unknown)}; it takes {', '.join(accepted)}")
        return family.prepare(self, images, prompts, **kwargs).to(self.device)

    def use_settings(self, settings: PromptSettings | None = None, **fields: Any) -> HookedVLM:
        """Set the image mode, tile limit and template every `prepare` uses unless told otherwise:
        `use_settings(paper_settings(model))`, `use_settings(image_mode="pad")` (one field, the
        others kept), `use_settings(PromptSettings())` (the checkpoint's own). A setting the
        family does not take, or an unknown value, is a ValueError. Returns the model."""
        self.prompt_settings = updated(self, settings, fields)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ----------------------------------------------------------------------------- forward
    def forward(self, inputs: VLMInput, *, kv_cache: KVCache | None = None) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits for every position of every batch row."""
        _check_vlm_input(inputs)
        self.past_length = len(kv_cache) if kv_cache is not None else 0
        image_features = self.encode_images(inputs.pixel_values)
        inputs_embeds = self.embed_inputs(inputs.input_ids, image_features, inputs.image_token_mask())
        return self.run_language_model(inputs_embeds, inputs.attention_mask, inputs.position_ids, kv_cache)

    def encode_images(self, pixel_values: Float[Tensor, "view channel height width"]) -> Float[Tensor, "image_token d_model"]:
        """Vision tower and projector: the features scattered into the language model, views in order."""
        features = self.vision(pixel_values.to(self.vision.patch_embed.weight.device))
        features = self.projector(features.to(self.projector.linear_1.weight.device))
        return features.reshape(-1, features.shape[-1])

    def embed_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"],
        image_features: Float[Tensor, "image_token d_model"] | None,
        image_mask: torch.Tensor | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings, with the image features written at the image-token positions."""
        input_ids = input_ids.to(self.device)
        image_mask = None if image_mask is None else image_mask.to(self.device)
        if not 0 <= self.cfg.image_token_id < self.cfg.text.d_vocab and image_mask is not None:
            # Checkpoints whose vocabulary has no image token (original LLaVA): look the image
            # positions up as token 0; their embedding is overwritten below.
            input_ids = input_ids.masked_fill(image_mask, 0)
        embeds = self.hook_embed(self.embed(input_ids))
        if image_features is not None and image_mask is not None:
            n_tokens = int(image_mask.sum())
            if n_tokens != image_features.shape[0]:
                raise ValueError(
                    f"the prompts hold {n_tokens} image tokens but the images produced {image_features.shape[0]} features"
                )
            embeds = embeds.masked_scatter(image_mask[..., None], image_features.to(embeds.device, embeds.dtype))
        return self.hook_inputs_embeds(embeds)

    def run_language_model(
        self,
        inputs_embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch key_pos"],
        position_ids: Int[Tensor, "batch pos"],
        kv_cache: KVCache | None = None,
        start_at_layer: int = 0,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Blocks, final norm and unembedding. `attention_mask` covers cached and new positions.
        With `start_at_layer=L`, `inputs_embeds` is the residual stream entering block L (its
        `hook_resid_pre`) and blocks before L are skipped, as TransformerLens's argument of that
        name; `kv_cache` must then hold the cached positions' keys and values of blocks L.."""
        if not 0 <= start_at_layer < self.cfg.n_layers:
            raise IndexError(f"start_at_layer {start_at_layer} out of range: the language model has {self.cfg.n_layers} layers")
        # Hooks that address sequence positions read this to place a decoding step's [batch, 1]
        # activations: the new positions are past_length, past_length + 1, ... (set here and by
        # every caller before `embed_inputs`, so hook_embed/hook_inputs_embeds see it too)
        self.past_length = len(kv_cache) if kv_cache is not None else 0
        dtype, q_len = inputs_embeds.dtype, inputs_embeds.shape[1]
        plain = is_plain_causal(attention_mask, q_len)  # no mask: SDPA's is_causal, or one query
        causal = plain and q_len > 1
        per_device: dict[torch.device, tuple] = {}  # rotary tables and mask, once per device
        resid = inputs_embeds
        for block in self.blocks[start_at_layer:]:
            device = block.ln1.weight.device
            if device not in per_device:
                rotary = self.rotary(position_ids.to(device), dtype)
                per_device[device] = (rotary, None if plain else causal_mask(attention_mask.to(device), q_len, dtype))
            rotary, mask = per_device[device]
            resid = block(resid.to(device), rotary=rotary, mask=mask, causal=causal, kv_cache=kv_cache)
        return self.final_logits(resid)

    def final_logits(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """The final norm, then the unembedding. Each runs on its own device: a device map may
        put them on different GPUs (accelerate does when only the small norm fits beside the last block)."""
        normalized = self.ln_final(resid.to(self.ln_final.weight.device))
        return self.unembed(normalized.to(self.unembed.weight.device))

    # ----------------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """`HookedRootModule.hooks`, plus two checks: hook names must exist (a typo is an error,
        not a silent no-op) and a forward hook must return None or a tensor of the shape, dtype
        and device it was given."""
        fwd = [(self._checked_name(name), _output_checked(fn)) for name, fn in fwd_hooks]
        bwd = [(self._checked_name(name), fn) for name, fn in bwd_hooks]
        with super().hooks(fwd, bwd, reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        """`HookedRootModule.add_hook` with the checks of `hooks`: a known name, and a forward hook
        that returns None or a tensor like the one it was given."""
        hook = _output_checked(hook) if dir == "fwd" else hook
        super().add_hook(self._checked_name(name), hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _checked_name(self, name: str | Callable) -> str | Callable:
        if callable(name) or name in self.hook_dict:
            return name
        close = difflib.get_close_matches(str(name), list(self.hook_dict), n=3)
        raise ValueError(f"unknown hook name {name!r}" + (f"; did you mean {close}?" if close else ""))

    # ----------------------------------------------------------------------------- caching
    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any):
        """As `HookedRootModule.run_with_cache`, returning a transformer_lens `ActivationCache`
        (`VLMActivationCache`, see `hooked_vlm.cache`). `names_filter`, `device` (e.g. "cpu" to
        offload) and `pos_slice` restrict what is kept.

        The first cache kept in CPU memory switches glibc's malloc to keeping freed memory for
        reuse (`hooked_vlm.keep_freed_memory`), as PyTorch's allocator does on CUDA: otherwise
        each call page-faults its whole cache in anew (2.5-3.8x the forward for a 4.8 GB cache
        instead of ~1.2x). The process then keeps its peak resident size until
        `hooked_vlm.release_freed_memory()`; opt out with `hooked_vlm.keep_freed_memory(False)`
        or `HOOKED_VLM_KEEP_FREED_MEMORY=0`."""
        if kwargs.get("incl_bwd"):
            raise ValueError(
                "incl_bwd needs a scalar output to call backward on, and the weights load without gradients; "
                "add backward hooks with `model.hooks(bwd_hooks=...)` and call backward on your own metric "
                "(hooked_vlm.patching.head_attribution does this for attribution patching)"
            )
        if kwargs.get("remove_batch_dim") and model_args and len(model_args[0]) != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, got {len(model_args[0])}")
        if torch.device(kwargs.get("device") or self.device).type == "cpu":
            keep_freed_memory_by_default()
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        return out, VLMActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    @property
    def attention_implementation(self) -> str:
        """"eager" after `set_attention_implementation("eager")`, else "auto"."""
        return "eager" if any(getattr(module, "force_eager", False) for module in self.modules()) else "auto"

    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False, cache=None, pos_slice=None):
        """TransformerLens's caching hooks, with two differences: names in a string or list
        filter must exist (a typo is an error, not an empty cache); and `pos_slice` cuts the
        position axis of every per-head hook `[batch, pos, head, d]` (q, k, v, their rotary and
        q/k-norm outputs, z, result) and keeps a copy of the slice only, where TransformerLens's
        own list of names would cut the head axis of the rotary and q/k-norm outputs."""
        if isinstance(names_filter, str):
            self._checked_name(names_filter)
        elif isinstance(names_filter, list):
            for name in names_filter:
                self._checked_name(name)
        cache, fwd, bwd = super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache, pos_slice=None)
        if pos_slice is None:
            return cache, fwd, bwd
        pos_slice = Slice.unwrap(pos_slice)

        def sliced(save: Callable) -> Callable:
            def hook(tensor: Tensor, hook: HookPoint):
                dim = -3 if tensor.dim() == 4 and hook.name.rsplit(".", 1)[-1] in PER_HEAD_HOOKS else -2
                return save(pos_slice.apply(tensor, dim=dim).clone() if tensor.dim() >= -dim else tensor, hook=hook)

            return hook

        return cache, [(name, sliced(fn)) for name, fn in fwd], [(name, sliced(fn)) for name, fn in bwd]

    def set_attention_implementation(self, implementation: str) -> None:
        """"auto" (default): materialise attention patterns only when a hook reads or edits them,
        else use `F.scaled_dot_product_attention`; "eager": always materialise them (and run a
        mixture of experts one expert at a time, in expert order, as transformers' eager experts)."""
        if implementation not in ("auto", "eager"):
            raise ValueError(f"attention implementation must be 'auto' or 'eager', got {implementation!r}")
        for module in self.modules():
            if hasattr(module, "force_eager"):
                module.force_eager = implementation == "eager"

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        inputs: VLMInput,
        max_new_tokens: int = 32,
        *,
        fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        return_tokens: bool = False,
        skip_special_tokens: bool = True,
    ) -> list[str] | Int[Tensor, "batch new_pos"]:
        """Greedy decoding with a KV cache. `fwd_hooks` are active on the prefill and on every
        decoding step (a hook sees `[batch, 1, ...]` activations on decoding steps). Rows stop at
        an end-of-sequence token; finished rows are padded. Returns decoded texts, or the new
        token ids (`return_tokens=True`)."""
        from hooked_vlm.generation import greedy_generate

        _check_vlm_input(inputs)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            tokens = greedy_generate(self, inputs, max_new_tokens)
        if return_tokens:
            return tokens
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=skip_special_tokens)


def _check_vlm_input(inputs: Any) -> None:
    # TransformerLens's first habit, model(tokens), would otherwise end in "no attribute 'pixel_values'"
    if not isinstance(inputs, VLMInput):
        raise TypeError(
            f"HookedVLM runs a VLMInput, not a {type(inputs).__name__}: build it with model.prepare(images, prompts), "
            "which lays out the image tokens and their pixels (token ids alone carry no image)"
        )


def _output_checked(fn: Callable) -> Callable:
    """Wrap a forward hook so that returning anything but None or a tensor like the one it was
    given (shape, dtype, device) raises at once, naming the hook."""

    @functools.wraps(fn)
    def checked(tensor: Tensor, *, hook: HookPoint):
        out = fn(tensor, hook=hook)
        if out is None:
            return out
        if not isinstance(out, Tensor):
            raise TypeError(f"hook on {hook.name} returned a value of type {type(out).__name__}; a forward hook returns None or a tensor")
        for what, got, expected in (("shape", tuple(out.shape), tuple(tensor.shape)), ("dtype", out.dtype, tensor.dtype), ("device", out.device, tensor.device)):
            if got != expected:
                raise ValueError(f"hook on {hook.name} returned {what} {got}; expected {expected}")
        return out

    return checked
