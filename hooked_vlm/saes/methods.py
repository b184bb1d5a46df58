"""SAELens's `HookedSAETransformer` method names on `HookedVLM` (each delegates to `hooked_vlm.saes`).

SAEs are spliced for one call or one `with` block, never left attached: SAELens's
`reset_saes_end=False`, `add_sae` and `reset_saes` (SAEs as lasting global state) are not offered.
"""

from __future__ import annotations

from typing import Any, Sequence


class SAEMethods:
    def saes(self, saes: Sequence = (), reset_saes_end: bool = True, use_error_term: bool | None = None, *, tokens=None, inputs=None):
        """A `with` block in which `saes` are spliced (generation included):
        `with model.saes([sae], tokens="image", inputs=inputs): model.generate(inputs)`.
        See `hooked_vlm.saes.spliced`."""
        from hooked_vlm.saes.splice import spliced

        _refuse_lasting(reset_saes_end)
        return spliced(self, saes, use_error_term=use_error_term, tokens=tokens, inputs=inputs)

    def run_with_saes(self, *model_args: Any, saes: Sequence = (), reset_saes_end: bool = True, use_error_term: bool | None = None, tokens=None, **kwargs: Any):
        """Logits with `saes` spliced in for this call (`tokens`: "image", "text", a TokenSet ...)."""
        from hooked_vlm.saes.splice import run_with_saes

        _refuse_lasting(reset_saes_end)
        return run_with_saes(self, *model_args, saes=saes, use_error_term=use_error_term, tokens=tokens, **kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Sequence = (), reset_saes_end: bool = True, use_error_term: bool | None = None, tokens=None, **kwargs: Any
    ):
        """`run_with_cache` with `saes` spliced in; their features are cached under
        `"<hook>.hook_sae_acts_post"` and the other SAE hook names."""
        from hooked_vlm.saes.splice import run_with_cache_with_saes

        _refuse_lasting(reset_saes_end)
        return run_with_cache_with_saes(self, *model_args, saes=saes, use_error_term=use_error_term, tokens=tokens, **kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: Sequence = (), reset_saes_end: bool = True, use_error_term: bool | None = None, tokens=None, **kwargs: Any
    ):
        """`run_with_hooks` with `saes` spliced in (hooks may address their features)."""
        from hooked_vlm.saes.splice import run_with_hooks_with_saes

        _refuse_lasting(reset_saes_end)
        return run_with_hooks_with_saes(self, *model_args, saes=saes, use_error_term=use_error_term, tokens=tokens, **kwargs)


    def add_sae(self, sae, use_error_term: bool | None = None):
        """SAELens's lasting splice, refused with the way to do it here."""
        raise NotImplementedError(LASTING)

    def reset_saes(self, *args: Any, **kwargs: Any):
        """SAELens's undo of `add_sae`: nothing to undo, SAEs never stay attached."""
        raise NotImplementedError(LASTING)


LASTING = (
    "SAEs are spliced for one call or one block, never left attached (no add_sae/reset_saes): "
    "`with model.saes([sae]): ...` (generation included) or model.run_with_saes(inputs, saes=[sae])"
)


def _refuse_lasting(reset_saes_end: bool) -> None:
    if not reset_saes_end:
        raise ValueError("SAEs are spliced for a call or a `with model.saes(...)` block only; reset_saes_end=False is not supported")
