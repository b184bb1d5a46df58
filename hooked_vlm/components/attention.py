"""One hooked attention component for both towers.

Options (from `TransformerConfig`): multi-head or grouped-query, rotary or no positional term,
q/k RMSNorm per head (Qwen3) or over the full width (InternViT-6B), causal or bidirectional
(the mask is built by the caller; a plain causal mask is left to SDPA's `is_causal`), softmax in
fp32 (Llama, CLIP) or in the activation dtype (InternViT). Numerics follow the Hugging Face eager implementations step by step
(ARCHITECTURES §0.5): `(q @ kᵀ) * scale`, add the mask, softmax, `@ v`, output projection.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.allocator import keep_freed_memory_by_default
from hooked_vlm.components.norms import RMSNorm
from hooked_vlm.config import TransformerConfig


class KVCache:
    """Keys and values of every layer seen so far: `[batch, kv_head, pos, d_head]` per layer.

    A *frozen* cache (`frozen_copy`) serves a fixed prefix to many continuations: `update`
    returns prefix + new keys without storing them, and a batch-1 prefix is broadcast to the
    continuation's batch without copying it.
    """

    def __init__(self, n_layers: int, frozen: bool = False):
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.frozen = frozen

    def __len__(self) -> int:
        """Number of cached positions."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            past_k, past_v = self.keys[layer], self.values[layer]
            if past_k.shape[0] != k.shape[0]:
                past_k, past_v = past_k.expand(k.shape[0], -1, -1, -1), past_v.expand(k.shape[0], -1, -1, -1)
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        if not self.frozen:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def frozen_copy(self) -> KVCache:
        out = KVCache(len(self.keys), frozen=True)
        out.keys, out.values = list(self.keys), list(self.values)
        return out

class RotaryEmbedding(nn.Module):
    """Default RoPE (rotate-half convention) as Llama and Qwen3 compute it (ARCHITECTURES §0.4)."""

    def __init__(self, d_head: int, base: float):
        super().__init__()
        self.d_head, self.base = d_head, base
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Float[Tensor, "half_d_head"]:
        # Computed once on the CPU in fp32, as Hugging Face does at init, then moved: the same bits
        # on every device.
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.d_head, 2, dtype=torch.float) / self.d_head
            self._inv_freq[device] = (1.0 / (self.base**exponent)).to(device)
        return self._inv_freq[device]

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        # cos/sin are built in fp32 and cast to the activation dtype before use (pitfall 7)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Float[Tensor, "batch pos d_head"], sin: Float[Tensor, "batch pos d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    cos, sin = cos[:, :, None], sin[:, :, None]
    return (x * cos) + (rotate_half(x) * sin)


def repeat_kv(x: Float[Tensor, "batch kv_head pos d_head"], n_rep: int) -> Float[Tensor, "batch head pos d_head"]:
    """Each key/value head serves `n_rep` consecutive query heads (Hugging Face's `repeat_kv`)."""
    if n_rep == 1:
        return x
    b, kvh, p, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, p, d).reshape(b, kvh * n_rep, p, d)


class Attention(nn.Module):
    """Hooked self-attention. Weights are stored fused (one `nn.Linear` per projection, as in
    Hugging Face) so matmuls match the reference bit for bit; `W_Q`, `W_K`, `W_V`, `W_O` and the
    biases are TransformerLens-shaped views.

    Hooks, in order: `hook_q`, `hook_k`, `hook_v` `[batch, pos, head, d_head]` (before q/k norm),
    `q_norm.hook_normalized`/`k_norm.hook_normalized` (when q/k norm is on), `hook_rot_q`,
    `hook_rot_k` (rotary only), `hook_attn_scores` `[batch, head, query_pos, key_pos]` (scaled,
    masked, before softmax), `hook_pattern`, `hook_z` `[batch, pos, head, d_head]`, and
    `hook_result` `[batch, pos, head, d_model]` (per-head output `z_h @ W_O[h]`, without the output
    bias; computed only when something is attached to it). Without a hook on the scores or the pattern, the pattern is never
    materialised: `F.scaled_dot_product_attention` computes the same attention.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        h, kvh, dh, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        self.n_rep = h // kvh
        self.scale = dh**-0.5
        self.q_proj = nn.Linear(d, h * dh, bias=cfg.attn_bias, dtype=cfg.dtype)
        self.k_proj = nn.Linear(d, kvh * dh, bias=cfg.attn_bias, dtype=cfg.dtype)
        self.v_proj = nn.Linear(d, kvh * dh, bias=cfg.attn_bias, dtype=cfg.dtype)
        self.o_proj = nn.Linear(h * dh, d, bias=cfg.attn_out_bias, dtype=cfg.dtype)
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        if cfg.qk_norm is not None:
            q_width, k_width = (dh, dh) if cfg.qk_norm == "head" else (h * dh, kvh * dh)
            self.q_norm = RMSNorm(q_width, cfg.qk_norm_eps, cfg.dtype)
            self.k_norm = RMSNorm(k_width, cfg.qk_norm_eps, cfg.dtype)
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()
        self.force_eager = False  # set by HookedVLM.set_attention_implementation
        # per-query-head keys and values (hooked_vlm.circuits.ungrouped_kv); no effect without GQA
        self.ungroup_kv = False

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: Float[Tensor, "batch 1 pos key_pos"] | None = None,
        causal: bool = False,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`mask` is additive. `causal=True` (with no `mask`) stands for the plain causal mask over
        as many queries as keys, nothing padded: SDPA runs its `is_causal` kernel (about 2x faster
        on CPU than with an explicit mask, and what transformers does), and the mask is built only
        when the pattern is materialised. Neither: every query sees every key."""
        b, p, _ = x.shape
        q = self.q_proj(x).view(b, p, self.cfg.n_heads, self.cfg.d_head)
        k = self.k_proj(x).view(b, p, self.cfg.n_key_value_heads, self.cfg.d_head)
        v = self.v_proj(x).view(b, p, self.cfg.n_key_value_heads, self.cfg.d_head)
        return self._attend(q, k, v, rotary=rotary, mask=mask, causal=causal, kv_cache=kv_cache, layer=layer)

    def forward_split(
        self,
        xq: Float[Tensor, "batch pos head d_model"],
        xk: Float[Tensor, "batch pos kv_head d_model"],
        xv: Float[Tensor, "batch pos kv_head d_model"],
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: Float[Tensor, "batch 1 pos key_pos"] | None = None,
        causal: bool = False,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The per-head input path (TransformerLens's split q/k/v inputs): each query head reads
        its own (already normalised) input, and so does each key/value head — one per key/value
        head (`kv_head = n_key_value_heads`) or one per query head (`kv_head = n_heads`, the
        ungrouped convention, where heads of one group may read different inputs). Same hooks
        and numerics as `forward` after the projections; with every input equal to `x` it is
        `forward(x)` up to rounding (the projections are per-head matmuls instead of one)."""
        q = self._split_projection(xq, self.q_proj)
        k = self._split_projection(xk, self.k_proj)
        v = self._split_projection(xv, self.v_proj)
        return self._attend(q, k, v, rotary=rotary, mask=mask, causal=causal, kv_cache=kv_cache, layer=layer)

    def attend(
        self,
        q: Float[Tensor, "batch pos head d_head"],
        k: Float[Tensor, "batch pos kv_head d_head"],
        v: Float[Tensor, "batch pos kv_head d_head"],
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: Float[Tensor, "batch 1 pos key_pos"] | None = None,
        causal: bool = False,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention from projected queries, keys and values (before q/k norm and rotary, as
        `hook_q`/`hook_k`/`hook_v` see them; `kv_head` as in `forward_split`): everything of
        `forward` after the projections, with the same hooks."""
        return self._attend(q, k, v, rotary=rotary, mask=mask, causal=causal, kv_cache=kv_cache, layer=layer)

    def _split_projection(self, x: Float[Tensor, "batch pos n d_model"], proj: nn.Linear) -> Float[Tensor, "batch pos n d_head"]:
        weight = self.input_weight(proj, x.shape[2])
        out = einops.einsum(x, weight, "b p h m, h m d -> b p h d")
        return out if proj.bias is None else out + self._bias_view(proj, x.shape[2] * self.cfg.d_head // proj.weight.shape[0])

    def input_weight(self, proj: nn.Linear, n: int) -> Float[Tensor, "n d_model d_head"]:
        """`proj`'s weight per input head, for `n` inputs: one per projected head, or (keys and
        values of grouped-query attention, `n = n_heads`) one per query head, each group's head
        repeated (TransformerLens's `W_K`/`W_V` views)."""
        n_proj = proj.weight.shape[0] // self.cfg.d_head
        if n not in (n_proj, self.cfg.n_heads):
            raise ValueError(f"per-head inputs have {n} heads; expected {n_proj} or {self.cfg.n_heads}")
        weight = einops.rearrange(proj.weight, "(h d) m -> h m d", d=self.cfg.d_head)
        return weight.repeat_interleave(n // n_proj, dim=0)

    def _attend(
        self,
        q: Float[Tensor, "batch pos head d_head"],
        k: Float[Tensor, "batch pos kv_head d_head"],
        v: Float[Tensor, "batch pos kv_head d_head"],
        *,
        rotary: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        causal: bool,
        kv_cache: KVCache | None,
        layer: int,
    ) -> Float[Tensor, "batch pos d_model"]:
        b, p = q.shape[:2]
        if self.ungroup_kv and k.shape[2] != q.shape[2]:
            # each query head gets its own copy of its group's key and value (TransformerLens's
            # `ungroup_grouped_query_attention`): hook_k/hook_v become per query head, outputs unchanged
            k, v = k.repeat_interleave(self.n_rep, dim=2), v.repeat_interleave(self.n_rep, dim=2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.cfg.qk_norm is not None:
            q, k = self._apply_qk_norm(self.q_norm, q), self._apply_qk_norm(self.k_norm, k)
        if rotary is not None:
            q = self.hook_rot_q(apply_rotary(q, *rotary))
            k = self.hook_rot_k(apply_rotary(k, *rotary))

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if causal and mask is None and k.shape[2] != p:  # SDPA's is_causal aligns the queries with the first keys
            raise ValueError(f"causal=True needs as many queries as keys, got {p} queries and {k.shape[2]} keys: pass an explicit mask")
        n_rep = q.shape[1] // k.shape[1]
        if self.force_eager or self._pattern_is_hooked():
            if q.device.type == "cpu":  # patterns are large and short-lived: keep freed memory (hooked_vlm.allocator)
                keep_freed_memory_by_default()
            if causal and mask is None:
                mask = causal_mask(torch.ones(1, k.shape[2], dtype=torch.bool, device=q.device), p, q.dtype)
            z = self._eager_attention(q, k, v, mask, n_rep)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.scale, enable_gqa=n_rep > 1
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]

        out = self.o_proj(z.reshape(b, p, -1))
        if _has_hooks(self.hook_result):
            out = self._hooked_result(z, out)
        return out

    def _hooked_result(self, z: Float[Tensor, "batch pos head d_head"], out: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """Run `hook_result` on the per-head outputs and carry its edits into `out`. Untouched,
        the output stays `o_proj(z)` bit for bit (a cache or a read-only hook changes nothing);
        a returned replacement adds its difference; an in-place edit (the original is gone)
        sums the heads."""
        result = einops.einsum(z, self.W_O, "b p h d, h d m -> b p h m")
        version = result._version
        edited = self.hook_result(result)
        if result._version != version:  # edited in place
            return edited.sum(dim=-2) + self.b_O
        if edited is not result:
            return out + (edited - result).sum(dim=-2)
        if torch.is_grad_enabled() and self.hook_result.bwd_hooks:  # let gradients reach its backward hooks
            return out + (edited - edited.detach()).sum(dim=-2)
        return out

    def _apply_qk_norm(self, norm: RMSNorm, x: Float[Tensor, "batch pos head d_head"]) -> Tensor:
        if self.cfg.qk_norm == "head":
            return norm(x)
        if x.shape[-2] * x.shape[-1] != norm.weight.shape[0]:
            raise NotImplementedError("a full-width q/k norm cannot serve per-query-head keys (ungrouped grouped-query attention)")
        # InternViT-6B normalises the whole projected vector before the head split (pitfall 3)
        return norm(x.flatten(-2)).view(x.shape)

    def _eager_attention(
        self,
        q: Float[Tensor, "batch head pos d_head"],
        k: Float[Tensor, "batch kv_head key_pos d_head"],
        v: Float[Tensor, "batch kv_head key_pos d_head"],
        mask: Tensor | None,
        n_rep: int,
    ) -> Float[Tensor, "batch head pos d_head"]:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # in place: the same values as `(q @ kᵀ) * scale + mask`, two fewer [head, query, key] tensors
        scores = torch.matmul(q, k.transpose(2, 3)).mul_(self.scale)
        if mask is not None:
            scores.add_(mask)
        scores = self.hook_attn_scores(scores)
        if self.cfg.softmax_in_fp32:
            pattern = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        else:
            pattern = F.softmax(scores, dim=-1)
        pattern = self.hook_pattern(pattern)
        return torch.matmul(pattern, v)

    def _pattern_is_hooked(self) -> bool:
        return _has_hooks(self.hook_attn_scores) or _has_hooks(self.hook_pattern)

    # TransformerLens-shaped weight views (query heads; key/value heads repeated for GQA)
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return einops.rearrange(self.q_proj.weight, "(h d) m -> h m d", d=self.cfg.d_head)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        w = einops.rearrange(self.k_proj.weight, "(h d) m -> h m d", d=self.cfg.d_head)
        return w.repeat_interleave(self.n_rep, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        w = einops.rearrange(self.v_proj.weight, "(h d) m -> h m d", d=self.cfg.d_head)
        return w.repeat_interleave(self.n_rep, dim=0)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "m (h d) -> h d m", d=self.cfg.d_head)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._bias_view(self.q_proj, 1)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._bias_view(self.k_proj, self.n_rep)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._bias_view(self.v_proj, self.n_rep)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        bias = self.o_proj.bias
        return bias if bias is not None else torch.zeros(self.cfg.d_model, dtype=self.o_proj.weight.dtype, device=self.o_proj.weight.device)

    def _bias_view(self, proj: nn.Linear, n_rep: int) -> Tensor:
        if proj.bias is None:
            n = proj.weight.shape[0] // self.cfg.d_head * n_rep
            return torch.zeros(n, self.cfg.d_head, dtype=proj.weight.dtype, device=proj.weight.device)
        return proj.bias.view(-1, self.cfg.d_head).repeat_interleave(n_rep, dim=0)


def is_plain_causal(attention_mask: Int[Tensor, "batch key_pos"], q_len: int) -> bool:
    """transformers' rule for SDPA (masking_utils._ignore_causal_mask_sdpa): nothing padded and as
    many queries as keys (SDPA's `is_causal`), or one query (no mask at all): no mask is built."""
    return q_len in (1, attention_mask.shape[1]) and bool(attention_mask.all())


def causal_mask(
    attention_mask: Int[Tensor, "batch key_pos"], q_len: int, dtype: torch.dtype
) -> Float[Tensor, "batch 1 pos key_pos"]:
    """Additive mask, 0 where a query may attend and the dtype's minimum elsewhere: causal over
    the last `q_len` positions and blind to padding — Hugging Face's eager mask, value for value."""
    kv_len = attention_mask.shape[1]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=attention_mask.device)
    k_pos = torch.arange(kv_len, device=attention_mask.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask[:, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _has_hooks(hook: HookPoint) -> bool:
    return bool(hook.fwd_hooks or hook.bwd_hooks)
