"""Sparse autoencoders on any hook, image tokens included.

Load one from the formats of the field (each a function of `formats`), splice it into a model
as SAELens's `HookedSAETransformer` does, and read, cache, patch or ablate its features like any
activation:

    from hooked_vlm import saes, interventions as iv

    sae = saes.load_sae("path/to/sae")             # SAELens dir, sparsify dir, Qwen-Scope layer{n}.sae.pt
    logits = model.run_with_saes(inputs, saes=[sae])                     # reconstruction replaces the activation
    logits, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)   # forward exact
    feats = cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"]               # [batch, pos, d_sae]
    with model.saes([sae], tokens="image", inputs=inputs):                # only image tokens are replaced
        texts = model.generate(inputs)
    saes.reconstruction_report(model, inputs, sae)    # MSE, explained variance, Δloss: image vs text tokens

Formats: `load_saelens` (cfg.json + sae_weights.safetensors; `save_saelens` writes it),
`load_sparsify` (EleutherAI sparsify / lmms-lab's LLaVA-NeXT SAEs), `load_qwen_scope`
(`layer{n}.sae.pt`, read with `torch.load(weights_only=True)`: pickled code is refused) and
`from_state_dict`. Encoders: ReLU, JumpReLU, TopK. Qwen-Scope's Qwen3 SAEs map onto
InternVL3.5's language model: `qwen_scope_releases`, `load_qwen_scope_layer`.
"""

from hooked_vlm.saes.formats import (
    from_state_dict,
    load_qwen_scope,
    load_sae,
    load_saelens,
    load_sparsify,
    save_saelens,
    sparsify_hook_name,
)
from hooked_vlm.saes.qwen_scope import (
    QWEN_SCOPE_RELEASES,
    QwenScopeRelease,
    load_qwen_scope_layer,
    qwen_scope_hook_name,
    qwen_scope_releases,
)
from hooked_vlm.saes.report import reconstruction_report
from hooked_vlm.saes.sae import SAE, SAEConfig
from hooked_vlm.saes.splice import (
    SAE_HOOKS,
    resolve_tokens,
    run_with_cache_with_saes,
    run_with_hooks_with_saes,
    run_with_saes,
    spliced,
)

__all__ = [
    "SAE",
    "SAEConfig",
    "SAE_HOOKS",
    "QWEN_SCOPE_RELEASES",
    "QwenScopeRelease",
    "from_state_dict",
    "load_qwen_scope",
    "load_qwen_scope_layer",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "qwen_scope_hook_name",
    "qwen_scope_releases",
    "reconstruction_report",
    "resolve_tokens",
    "run_with_cache_with_saes",
    "run_with_hooks_with_saes",
    "run_with_saes",
    "save_saelens",
    "sparsify_hook_name",
    "spliced",
]
