"""How well an SAE reconstructs its hook's activation, image tokens and text tokens apart.

An SAE trained on text (Qwen-Scope on Qwen3) may read a VLM's image tokens poorly even where it
reads its text well: every number is reported per token type.

- `mse`: mean squared error per element, `mean((x - x_hat)^2)`.
- `explained_variance`: `1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over the type's tokens.
- `l0`: mean number of active features per token.
- `loss_clean`, `loss_spliced`, `delta_loss`: mean next-token loss (NLL) over the predicted text
  tokens (targets that are real, non-image tokens), on the plain model and with the SAE's
  reconstruction (no error term) replacing the activation at that type's tokens only.

Padding never counts. For a vision-tower hook every token is an image token (row "image").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pandas as pd
import torch
from torch import Tensor

from hooked_vlm.inputs import VLMInput
from hooked_vlm.interventions.tokens import TokenSet
from hooked_vlm.metrics import token_nll
from hooked_vlm.saes.sae import SAE
from hooked_vlm.saes.splice import resolve_tokens, run_with_saes


@dataclass
class _Sums:
    """Running sums over tokens, in float64."""

    n: int = 0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    total: Tensor | None = None
    active: float = 0.0
    nll_clean: float = 0.0
    nll_spliced: float = 0.0
    n_predicted: int = 0

    def add_tokens(self, x: Tensor, recons: Tensor, acts: Tensor) -> None:
        x, recons = x.double(), recons.double()
        self.n += x.shape[0]
        self.squared_error += float((x - recons).pow(2).sum())
        self.squared_norm += float(x.pow(2).sum())
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.active += float((acts != 0).sum())

    def row(self, d_in: int) -> dict:
        if self.n == 0:
            return {"n_tokens": 0}
        mean = self.total / self.n
        variance = self.squared_norm - self.n * float(mean.pow(2).sum())  # sum ||x - mean||^2
        loss_clean = self.nll_clean / self.n_predicted if self.n_predicted else float("nan")
        loss_spliced = self.nll_spliced / self.n_predicted if self.n_predicted else float("nan")
        return {
            "n_tokens": self.n,
            "mse": self.squared_error / (self.n * d_in),
            "explained_variance": 1 - self.squared_error / variance if variance > 0 else float("nan"),
            "l0": self.active / self.n,
            "loss_clean": loss_clean,
            "loss_spliced": loss_spliced,
            "delta_loss": loss_spliced - loss_clean,
        }


@torch.no_grad()
def reconstruction_report(model, inputs: VLMInput | Iterable[VLMInput], sae: SAE) -> pd.DataFrame:
    """One row per token type ("image", "text", "all"), columns as in the module's docstring,
    summed over every batch in `inputs` (a `VLMInput` or an iterable of them)."""
    batches = [inputs] if isinstance(inputs, VLMInput) else list(inputs)
    name = sae.cfg.hook_name
    vision = name.startswith("vision.")
    types = ("image",) if vision else ("image", "text", "all")
    sums = {kind: _Sums() for kind in types}
    for batch in batches:
        logits, cache = model.run_with_cache(batch, names_filter=[name])
        acts, recons = sae.features_and_reconstruction(cache[name])
        x = sae._flat(cache[name]).to(recons.device, recons.dtype)
        predicted, nll_clean = _predicted_text(batch, logits)
        for kind in types:
            where = None if vision or kind == "all" else resolve_tokens(kind, batch)
            tokens = torch.ones(x.shape[:2], dtype=torch.bool) if vision else _real(batch, where)
            tokens = tokens.to(x.device)
            sums[kind].add_tokens(x[tokens], recons[tokens], acts[tokens])
            spliced_logits = run_with_saes(model, batch, saes=[sae], use_error_term=False, tokens=where)
            _, nll_spliced = _predicted_text(batch, spliced_logits)
            sums[kind].nll_clean += float(nll_clean[predicted].sum())
            sums[kind].nll_spliced += float(nll_spliced[predicted].sum())
            sums[kind].n_predicted += int(predicted.sum())
    rows = {kind: s.row(sae.cfg.d_in) for kind, s in sums.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def _real(inputs: VLMInput, where: TokenSet | None) -> Tensor:
    real = inputs.attention_mask.cpu().bool()
    return real if where is None else real & where.mask


def _predicted_text(inputs: VLMInput, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Positions holding a real text token predicted from a real token before it, and the NLL at
    every position (`hooked_vlm.metrics.token_nll`)."""
    nll = token_nll(logits, inputs.input_ids).cpu().double()
    real = inputs.attention_mask.cpu().bool()
    predicted = real & ~inputs.image_token_mask().cpu()
    predicted[:, 0] = False
    predicted[:, 1:] &= real[:, :-1]  # the first token after left padding is predicted from padding
    return predicted, nll
