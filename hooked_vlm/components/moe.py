"""The mixture-of-experts MLP (Qwen3-MoE's sparse block), hooked: the block's MLP wherever
`cfg.is_moe_layer(layer)`.

Numerics follow transformers' `Qwen3MoeSparseMoeBlock` (ARCHITECTURES §2.3, pitfall 19): router
logits `x @ W_routerᵀ` in the activation dtype, softmax over every expert in fp32, top-k of the
probabilities, renormalised to sum to 1 when `norm_topk_prob`, cast back to the activation dtype;
each selected expert's `down_e(silu(gate_e x) * up_e x)` is multiplied by its weight and the
weighted outputs are summed.

Routing is dense: `hook_router_weights` holds one weight per expert, zero for the experts a token
does not use, and the experts that run are exactly those with a nonzero weight. An edit of the
weights therefore changes which experts contribute and by how much: a weight set to zero drops an
expert, a nonzero weight given to an unselected expert runs that expert for that token.

Two ways to run the experts, over the (token, expert) pairs sorted by expert, never by token:
- eager (`HookedVLM.set_attention_implementation("eager")`, as `check_parity` runs it, and whenever
  activations carry gradients): one matmul per used expert, in expert order, each added into the
  output with `index_add_` — Hugging Face's eager experts, operation for operation.
- auto (default): `F.grouped_mm` over all experts at once where PyTorch has it for the device and
  dtype (transformers' default `grouped_mm` experts); otherwise as eager.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import _has_hooks
from hooked_vlm.components.mlp import activation
from hooked_vlm.config import TransformerConfig

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoEMLP(nn.Module):
    """Hooks, in order: `hook_router_logits` `[batch, pos, expert]` (before the softmax),
    `hook_router_weights` `[batch, pos, expert]` (after top-k and normalisation; zero for
    unselected experts), `hook_expert_out` `[batch, pos, expert, d_model]` (each expert's weighted
    output, zero where it is not used; their sum over experts is the MLP's output; computed only
    when something is attached to it, and then `num_experts` x the size of `hook_mlp_out`).

    There is no `hook_pre`/`hook_post`: a token's hidden activations live in the experts it is
    routed to, not in one `[batch, pos, d_mlp]` tensor. Expert e's are
    `act(x @ experts_W_gate[e]) * (x @ experts_W_in[e])` with `x` = `ln2.hook_normalized`.

    Weights are stored as transformers 5.x holds them: `router.weight` `[expert, d_model]`,
    `gate_up_proj` `[expert, 2 * d_mlp, d_model]` (gate rows, then up rows), `down_proj`
    `[expert, d_model, d_mlp]`. TransformerLens-shaped views: `W_router` `[d_model, expert]` (what
    TransformerLens's own MoE calls `W_gate`), and each expert's `experts_W_gate`, `experts_W_in`
    `[expert, d_model, d_mlp]`, `experts_W_out` `[expert, d_mlp, d_model]`. The dense MLP's names
    (`W_in`, `W_gate`, `W_out`, `b_in`, `b_out`) are left out on purpose: there is no single one,
    and stacked views over the layers must not mistake an expert axis for one.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.act = activation(cfg.act_fn)
        n, d, f = cfg.num_experts, cfg.d_model, cfg.d_mlp
        self.router = nn.Linear(d, n, bias=False, dtype=cfg.dtype)
        self.hook_router_logits = HookPoint()
        self.hook_router_weights = HookPoint()
        self.gate_up_proj = nn.Parameter(torch.zeros(n, 2 * f, d, dtype=cfg.dtype))
        self.down_proj = nn.Parameter(torch.zeros(n, d, f, dtype=cfg.dtype))
        self.hook_expert_out = HookPoint()
        self.force_eager = False  # set by HookedVLM.set_attention_implementation

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        b, p, d = x.shape
        logits = self.hook_router_logits(self.router(x))
        weights = self.hook_router_weights(self.route(logits))
        flat_x, flat_w = x.reshape(-1, d), weights.reshape(b * p, -1)
        token, expert, slot = _pairs_by_expert(flat_w)
        pair_weights = flat_w[token, expert].unsqueeze(-1)
        keep = _has_hooks(self.hook_expert_out)
        if self._use_grouped_mm(flat_x):
            out, contributions = self._grouped_experts(flat_x, token, expert, slot, pair_weights)
        else:
            out, contributions = self._eager_experts(flat_x, token, expert, pair_weights, keep)
        out = out.view(b, p, d)
        if keep:
            out = self._hooked_expert_out(contributions, token, expert, out)
        return out

    def route(self, logits: Float[Tensor, "batch pos expert"]) -> Float[Tensor, "batch pos expert"]:
        """Dense routing weights: the top-k softmax probabilities (fp32, renormalised when
        `norm_topk_prob`), zero elsewhere, in the logits' dtype."""
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top, index = probs.topk(self.cfg.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, top).to(logits.dtype)

    def expert(self, x: Float[Tensor, "token d_model"], e: int) -> Float[Tensor, "token d_model"]:
        """Expert `e`'s gated MLP (unweighted). Gate and up come from one matmul, as in HF."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def _eager_experts(self, x: Tensor, token: Tensor, expert: Tensor, pair_weights: Tensor, keep: bool):
        """Expert by expert in expert order, each weighted output added with `index_add_` (a
        token occurs once per expert, so every sum runs in expert order on every device)."""
        out = torch.zeros_like(x)
        contributions = []
        for e, rows in _expert_groups(expert, self.cfg.num_experts):
            contribution = self.expert(x[token[rows]], e) * pair_weights[rows]
            out.index_add_(0, token[rows], contribution.to(out.dtype))
            if keep:
                contributions.append(contribution)
        if not keep:
            return out, None
        return out, torch.cat(contributions) if contributions else x.new_zeros(0, x.shape[-1])

    def _grouped_experts(self, x: Tensor, token: Tensor, expert: Tensor, slot: Tensor, pair_weights: Tensor):
        """All experts in two grouped matmuls; each token's weighted outputs are laid out
        `[token, slot, d_model]` and summed over the slots (deterministic on CUDA, unlike
        `index_add_`), as transformers' grouped experts sum theirs."""
        if len(token) == 0:
            return torch.zeros_like(x), x.new_zeros(0, x.shape[-1])
        offsets = _expert_ends(expert, self.cfg.num_experts).to(torch.int32)
        gate, up = F.grouped_mm(x[token], self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        hidden = F.grouped_mm(self.act(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        contributions = hidden * pair_weights
        per_token = int(slot.max()) + 1
        if per_token * len(x) == len(token):  # every token has as many experts (top-k, unedited): no buffer to zero
            by_token = torch.empty_like(token)
            by_token[token * per_token + slot] = torch.arange(len(token), device=token.device)
            return contributions[by_token].view(len(x), per_token, -1).sum(dim=1), contributions
        buffer = x.new_zeros(len(x), per_token, x.shape[-1])
        buffer[token, slot] = contributions
        return buffer.sum(dim=1), contributions

    def _use_grouped_mm(self, x: Tensor) -> bool:
        if self.force_eager or x.requires_grad or not hasattr(F, "grouped_mm") or x.dtype not in GROUPED_MM_DTYPES:
            return False
        if x.device.type == "cuda":
            return torch.cuda.get_device_capability(x.device) >= (8, 0)
        # the CPU kernel wants every row 16-byte aligned
        row_bytes = (self.cfg.d_model * x.element_size(), self.cfg.d_mlp * x.element_size())
        return x.device.type == "cpu" and all(n % 16 == 0 for n in row_bytes)

    def _hooked_expert_out(self, contributions: Tensor, token: Tensor, expert: Tensor, out: Tensor) -> Tensor:
        """Run `hook_expert_out` on the dense per-expert outputs and carry its edits into `out`,
        as `Attention._hooked_result` does for heads: untouched, `out` stays as computed bit for
        bit; a returned replacement adds its difference; an in-place edit sums the experts."""
        b, p, d = out.shape
        dense = contributions.new_zeros(b * p, self.cfg.num_experts, d)
        dense[token, expert] = contributions
        dense = dense.view(b, p, self.cfg.num_experts, d)
        version = dense._version
        edited = self.hook_expert_out(dense)
        if dense._version != version:  # edited in place
            return edited.sum(dim=-2)
        if edited is not dense:
            return out + (edited - dense).sum(dim=-2)
        if torch.is_grad_enabled() and self.hook_expert_out.bwd_hooks:  # let gradients reach its backward hooks
            return out + (edited - edited.detach()).sum(dim=-2)
        return out

    # TransformerLens-shaped weight views
    @property
    def W_router(self) -> Float[Tensor, "d_model expert"]:
        return self.router.weight.T

    @property
    def experts_W_gate(self) -> Float[Tensor, "expert d_model d_mlp"]:
        return einops.rearrange(self.gate_up_proj[:, : self.cfg.d_mlp], "e f m -> e m f")

    @property
    def experts_W_in(self) -> Float[Tensor, "expert d_model d_mlp"]:
        return einops.rearrange(self.gate_up_proj[:, self.cfg.d_mlp :], "e f m -> e m f")

    @property
    def experts_W_out(self) -> Float[Tensor, "expert d_mlp d_model"]:
        return einops.rearrange(self.down_proj, "e m f -> e f m")


def _pairs_by_expert(weights: Float[Tensor, "token expert"]) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) pairs with a nonzero weight, sorted by expert (tokens ascending), and
    each pair's slot: how many pairs of its token come before it in expert order."""
    token, expert = weights.detach().nonzero(as_tuple=True)  # by token, experts ascending
    slot = torch.arange(len(token), device=token.device) - torch.searchsorted(token, token)
    order = torch.argsort(expert, stable=True)
    return token[order], expert[order], slot[order]


def _expert_ends(expert: Int[Tensor, "pair"], n_experts: int) -> Int[Tensor, "expert"]:
    """End of each expert's run of pairs in `expert` (sorted); `searchsorted`, not `bincount`,
    which has no deterministic CUDA kernel."""
    return torch.searchsorted(expert, torch.arange(n_experts, device=expert.device), right=True)


def _expert_groups(expert: Int[Tensor, "pair"], n_experts: int) -> list[tuple[int, slice]]:
    """(expert, rows of its pairs) for every used expert, in expert order (one host sync)."""
    ends = _expert_ends(expert, n_experts).tolist()
    starts = [0] + ends[:-1]
    return [(e, slice(start, end)) for e, (start, end) in enumerate(zip(starts, ends)) if end > start]
