"""Tiny random Hugging Face checkpoints, built offline and deterministically.

The test suite, the benchmarks and users who want to try the library without downloading
gigabytes all need real checkpoint *directories* that `transformers` loads like a hub model:
config, weights, tokenizer, processor and chat template. Everything here is built from nothing:
the tokenizers are BPE models trained on a small built-in English corpus, the weights are random.
Given the same arguments (and seed) every file is reproduced exactly.

What you get:

- `build_tiny_llava` / `build_tiny_internvl`: `LlavaForConditionalGeneration` (CLIP + Llama) and
  `InternVLForConditionalGeneration` (InternViT-300M or -6B style + Qwen3, or Qwen3-MoE with
  `num_experts=...`) directories. MoE experts are saved per expert, as transformers writes them;
  `fuse_expert_tensors` rewrites them as the fused tensors it holds in memory.
- `export_llava_original` / `export_internvl_original`: the same weights in the original
  `liuhaotian/llava-v1.5-*` and remote-code `InternVLChatModel` formats.
- `real_config`: the full-size HF configs (no weights), to build models on the meta device.
- `load_hf_processor`: `AutoProcessor`, with a fallback for InternVL when torchvision is missing.
- `hooked_vlm.testing.published`: every published LLaVA-1.5 / InternVL-3.5 repository as facts
  (configs field for field, weight-index fingerprints) and `build_published`, scaled-down copies
  of them with real metadata; `hooked_vlm.testing.hub_cache.add_to_hub_cache` lays a directory out
  as the Hugging Face cache does, so hub ids load offline.

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

from hooked_vlm.testing.common import (  # noqa: F401
    BICUBIC,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KeyLayout,
    apply_key_layout,
    fuse_expert_tensors,
    _rename_checkpoint_keys,
    legacy_key,
    load_runtime_state_dict,
    randomize_weights_,
    runtime_key,
)
from hooked_vlm.testing.tokenizers import (  # noqa: F401
    INTERNVL_CHAT_TEMPLATE,
    INTERNVL_SPECIAL_TOKENS,
    LLAVA_CHAT_TEMPLATE,
    build_internvl_tokenizer,
    build_llama_tokenizer,
    build_llava_tokenizer,
)
from hooked_vlm.testing.llava import (  # noqa: F401
    build_tiny_llava,
    export_llava_original,
    llava_processor,
    tiny_llava_config,
)
from hooked_vlm.testing.internvl import (  # noqa: F401
    build_tiny_internvl,
    export_internvl_original,
    internvl_processor,
    load_hf_processor,
    tiny_internvl_config,
)
from hooked_vlm.testing.real_configs import (  # noqa: F401
    real_config,
    real_config_names,
)

__all__ = [
    "KeyLayout",
    "apply_key_layout",
    "fuse_expert_tensors",
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
    "llava_processor",
    "internvl_processor",
    "build_tiny_llava",
    "build_tiny_internvl",
    "export_llava_original",
    "export_internvl_original",
    "load_hf_processor",
    "real_config",
    "real_config_names",
]

