"""The HookedTransformer surface: what a TransformerLens user reaches for, on a `HookedVLM`.

`HookedVLM` inherits `TransformerLensSurface`, `model.vision` inherits `VisionTowerSurface`:

    model.to_tokens("a cat"), model.to_string(ids), model.to_single_token(" cat")
    model.to_str_tokens(inputs)[0]          # one label per position: "<img v0 r3 c5>", "<pad>", text
    model.get_token_position("?", inputs)
    model.W_Q, model.b_Q, ..., model.W_in, model.W_gate, model.W_out, model.b_in, model.b_out,
    model.W_E, model.W_U, model.QK, model.OV  # stacked over layers; QK/OV are FactoredMatrix
    model.vision.W_Q, ..., model.vision.W_E (the patch conv), model.vision.W_pos,
    model.vision.to_str_tokens(inputs)      # per view: "<cls v0>", "<patch v0 r3 c5>", ...

Also part of the surface, each documented where it lives:
- `transformer_lens.utilities.get_act_name(...)` names hooks of the language model as they are
  named here ("vision." + it for the tower); `cache["pattern", 3]` works as in TransformerLens.
- `transformer_lens.patching`'s sweeps take a `VLMInput` where they take tokens
  (`get_act_patch_resid_pre(model, corrupted_inputs, clean_cache, metric)`), since a `VLMInput`
  has a `shape` ([batch, pos]) and the model runs it: the sweep's "pos" axis is every sequence
  position, image tokens and padding included. Results are allocated on `model.cfg.device`,
  which is None here (a model may span devices), so they land on torch's default device.
  `get_act_patch_direct_path` needs TransformerLens's split Q/K/V input and is not available.
- The SAE splicing of SAELens's `HookedSAETransformer` (`model.saes(...)`,
  `model.run_with_saes`, `model.run_with_cache_with_saes`): see `hooked_vlm.saes`.
"""

from __future__ import annotations

from hooked_vlm.inputs import VLMInput
from hooked_vlm.saes.methods import SAEMethods
from hooked_vlm.tl_surface.tokens import PAD_LABEL, TokenHelpers, image_token_label, vision_position_labels
from hooked_vlm.tl_surface.weights import LanguageModelWeights, StackedWeights, VisionTowerWeights


class TransformerLensSurface(TokenHelpers, LanguageModelWeights, SAEMethods):
    """Mixed into `HookedVLM`: token helpers, language-model weight views, SAE splicing."""

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens's switch for per-head copies of the residual stream before Q/K/V, which
        `get_act_patch_direct_path` needs: there are none here, so only False is accepted."""
        if use_split_qkv_input:
            raise NotImplementedError(
                "HookedVLM has no per-head copies of the residual stream before Q/K/V (TransformerLens's "
                "use_split_qkv_input), so transformer_lens.patching.get_act_patch_direct_path cannot run; "
                "patch a head's output into later heads' attn.hook_q/hook_k/hook_v instead"
            )


class VisionTowerSurface(VisionTowerWeights):
    """Mixed into `VisionTower`: weight views and position labels of the vision tower."""

    def to_str_tokens(self, inputs: VLMInput) -> list[list[str]]:
        """One label per vision-tower position for each view in `inputs.pixel_values`:
        `<cls v0>`, then `<patch v0 r3 c5>` for patch (r, c) — the axes of `vision.*` hooks."""
        return vision_position_labels(inputs.layout, self.cfg.n_grid)


__all__ = [
    "PAD_LABEL",
    "StackedWeights",
    "TokenHelpers",
    "TransformerLensSurface",
    "VisionTowerSurface",
    "image_token_label",
    "vision_position_labels",
]
