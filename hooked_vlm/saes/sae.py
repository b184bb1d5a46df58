"""One sparse autoencoder module with its own hook points (SAELens's names and conventions).

    sae_in   = hook_sae_input(x)                      # x cast to the SAE's dtype (heads flattened for hook_z)
    pre      = hook_sae_acts_pre((sae_in - b_dec?) @ W_enc + b_enc)
    acts     = hook_sae_acts_post(activation(pre))      # ReLU, JumpReLU (threshold) or TopK (k)
    recons   = hook_sae_recons(acts @ W_dec + b_dec)
    output   = hook_sae_output(recons)                  # without the error term
    output   = hook_sae_output(x + (recons - recons_clean) + (error - error_clean))   # with it

With the error term (`use_error_term=True`), `error_clean = x - recons_clean` is what the SAE
misses, computed by a second pass with no hook active (as SAELens does): edits to the features
change the output by exactly their effect on the reconstruction, edits to `hook_sae_error` by
theirs, and with no edit the output *is* `x`, bit for bit, whatever the SAE's dtype.

An SAE computes on its own device and in its own dtype (`sae.to("cuda")`, `sae.to(torch.bfloat16)`):
activations are moved there, and its output back to the activation's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

Architecture = Literal["relu", "topk", "jumprelu"]
ARCHITECTURES = ("relu", "topk", "jumprelu")


@dataclass
class SAEConfig:
    """What an SAE computes and where it reads.

    `architecture`: "relu" (SAELens's "standard"), "jumprelu" (a feature is kept where its
    pre-activation exceeds its `threshold`) or "topk" (the `k` largest pre-activations are kept;
    `signed=False` passes them through a ReLU as SAELens and sparsify do, `signed=True` keeps
    negative ones as Qwen-Scope does). `apply_b_dec_to_input`: subtract `b_dec` before encoding.
    `hook_name`: the hook whose activation it reconstructs, in this library's names.
    `reshape_activations="hook_z"`: the SAE reads `attn.hook_z` with its heads flattened.
    """

    d_in: int
    d_sae: int
    architecture: Architecture = "relu"
    k: int | None = None
    signed: bool = False
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    reshape_activations: Literal["none", "hook_z"] = "none"
    dtype: torch.dtype = torch.float32
    metadata: dict = field(default_factory=dict)  # the on-disk format, path, and what its config said

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise ValueError(f"a TopK SAE needs an integer k in 1..d_sae={self.d_sae}, got {self.k!r}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")


class SAE(HookedRootModule):
    """A sparse autoencoder: `W_enc` `[d_in, d_sae]`, `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`
    (and `threshold` for JumpReLU), SAELens's layout. Build one with a loader of
    `hooked_vlm.saes` or from tensors; splice it into a model with `hooked_vlm.saes.splice`."""

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        kw = dict(dtype=cfg.dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw), requires_grad=False)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw), requires_grad=False)
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw), requires_grad=False)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw), requires_grad=False)
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw), requires_grad=False)
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.setup()

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ----------------------------------------------------------------------------- the maps
    def encode(self, x: Float[Tensor, "... d_in"], hooks: bool = True) -> Float[Tensor, "... d_sae"]:
        """Feature activations of `x` (in the SAE's dtype). `hooks=False` runs no hook point."""
        hook = _hooked if hooks else _bare
        sae_in = hook(self.hook_sae_input, x)
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        pre = hook(self.hook_sae_acts_pre, sae_in @ self.W_enc + self.b_enc)
        return hook(self.hook_sae_acts_post, self._activation(pre))

    def _activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.cfg.architecture == "relu":
            return F.relu(pre)
        if self.cfg.architecture == "jumprelu":
            return F.relu(pre) * (pre > self.threshold)
        values, indices = pre.topk(self.cfg.k, dim=-1)
        if not self.cfg.signed:
            values = F.relu(values)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def decode(self, acts: Float[Tensor, "... d_sae"], hooks: bool = True) -> Float[Tensor, "... d_in"]:
        recons = acts @ self.W_dec + self.b_dec
        return self.hook_sae_recons(recons) if hooks else recons

    def forward(self, x: Tensor) -> Tensor:
        """The SAE's replacement for activation `x` (shape, dtype and device of `x`)."""
        sae_x = self._flat(x).to(self.device, self.dtype)
        recons = self.decode(self.encode(sae_x))
        if not self.use_error_term:
            return self.hook_sae_output(self._unflat(recons, x))
        if self._features_may_be_edited():
            with torch.no_grad():
                clean = self.decode(self.encode(sae_x, hooks=False), hooks=False)
        else:
            clean = recons  # the same computation: no hook ran on it
        error_clean = sae_x - clean
        error = self.hook_sae_error(error_clean)
        # the edits' effect, added to x in x's own dtype: zero (and x exact) when nothing is edited
        delta = (recons - clean) + (error - error_clean)
        return self.hook_sae_output(x + self._unflat(delta, x))

    def features_and_reconstruction(self, x: Tensor) -> tuple[Float[Tensor, "... d_sae"], Float[Tensor, "... d_in"]]:
        """Features and reconstruction of activation `x` (heads flattened for hook_z, the SAE's
        dtype and device), no hook point run: what a report or a probe reads."""
        sae_x = self._flat(x).to(self.device, self.dtype)
        acts = self.encode(sae_x, hooks=False)
        return acts, self.decode(acts, hooks=False)

    def _features_may_be_edited(self) -> bool:
        points = (self.hook_sae_input, self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        return any(point.fwd_hooks for point in points)

    def _flat(self, x: Tensor) -> Tensor:
        if self.cfg.reshape_activations == "hook_z":
            x = einops.rearrange(x, "... head d_head -> ... (head d_head)")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"the SAE reads {self.cfg.d_in} features per token but {self.cfg.hook_name or 'its hook'} "
                f"gives {x.shape[-1]} (activation shape {tuple(x.shape)})"
            )
        return x

    def _unflat(self, y: Tensor, like: Tensor) -> Tensor:
        return y.reshape(like.shape).to(like.device, like.dtype)

    # ----------------------------------------------------------------------------- tensors
    @classmethod
    def from_tensors(
        cls,
        cfg: SAEConfig,
        W_enc: Tensor,
        b_enc: Tensor | None,
        W_dec: Tensor,
        b_dec: Tensor | None,
        threshold: Tensor | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> SAE:
        """An SAE holding these tensors (SAELens's layout: `W_enc` `[d_in, d_sae]`, `W_dec`
        `[d_sae, d_in]`); absent biases are zero. Shapes are checked against `cfg`."""
        sae = cls(cfg, device=device)
        expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if cfg.architecture == "jumprelu":
            if threshold is None:
                raise ValueError("a JumpReLU SAE needs its threshold")
            expected["threshold"], given["threshold"] = (cfg.d_sae,), threshold
        with torch.no_grad():
            for name, tensor in given.items():
                if tensor is None:
                    continue
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}; an SAE of d_in={cfg.d_in}, d_sae={cfg.d_sae} needs {expected[name]}")
                getattr(sae, name).copy_(tensor)
        return sae


def _hooked(point: HookPoint, x: Tensor) -> Tensor:
    return point(x)


def _bare(point: HookPoint, x: Tensor) -> Tensor:
    return x
