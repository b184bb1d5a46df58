"""The hooked mixture-of-experts MLP: what each hook holds, and that editing the routing weights
changes which experts run and by how much. (Causality of every hook, caches, generation and bad
hook outputs: tests/test_hooks.py, parametrised over the MoE checkpoints.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooked_vlm import HookedVLM
from hooked_vlm.components import MoEMLP

LAYER = 0
HOOKS = ("ln2.hook_normalized", "mlp.hook_router_logits", "mlp.hook_router_weights", "mlp.hook_expert_out", "hook_mlp_out")
NAMES = [f"blocks.{LAYER}.{hook}" for hook in HOOKS]


@pytest.fixture(scope="module", params=["internvl_moe", "internvl_moe_top1"])
def model(request, tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint(request.param))


@pytest.fixture(scope="module")
def inputs(model, photos):
    return model.prepare([photos["rocket"], photos["grace_hopper"]], ["Where is the rocket?", "Who is this?"])


@pytest.fixture(scope="module")
def cache(model, inputs):
    _, cache = model.run_with_cache(inputs, names_filter=NAMES)
    return {name.split(".", 2)[-1]: cache[name] for name in NAMES}


def _mlp_out(model, inputs, hook_name, fn) -> torch.Tensor:
    with model.hooks(fwd_hooks=[(hook_name, fn)]):
        _, edited = model.run_with_cache(inputs, names_filter=f"blocks.{LAYER}.hook_mlp_out")
    return edited[f"blocks.{LAYER}.hook_mlp_out"]


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= atol


def test_router_weights_are_the_top_k_softmax_probabilities(model, cache):
    cfg = model.cfg.text
    probs = F.softmax(cache["mlp.hook_router_logits"].double(), dim=-1)
    weights = cache["mlp.hook_router_weights"]
    selected = weights != 0
    assert (selected.sum(-1) == cfg.experts_per_token).all()
    assert torch.equal(selected, torch.zeros_like(selected).scatter(-1, probs.topk(cfg.experts_per_token).indices, True))
    expected = probs * selected
    if cfg.norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    assert _close(weights.double(), expected, 1e-6)


def test_routing_uses_every_expert(model, cache):
    """The fixtures route the photos' tokens to every expert: no parity claim rests on an idle one."""
    used = (cache["mlp.hook_router_weights"] != 0).flatten(0, 1).any(0)
    assert used.all(), used


def test_expert_outputs_sum_to_the_mlp_output_and_vanish_for_unused_experts(cache):
    expert_out, weights = cache["mlp.hook_expert_out"], cache["mlp.hook_router_weights"]
    assert _close(expert_out.sum(-2), cache["hook_mlp_out"])
    assert (expert_out[weights == 0] == 0).all() and (expert_out[weights != 0].abs().sum(-1) > 0).all()


def test_weight_views_reproduce_each_expert_output(model, cache):
    mlp = model.blocks[LAYER].mlp
    cfg = model.cfg.text
    assert mlp.experts_W_gate.shape == mlp.experts_W_in.shape == (cfg.num_experts, cfg.d_model, cfg.d_mlp)
    assert mlp.experts_W_out.shape == (cfg.num_experts, cfg.d_mlp, cfg.d_model)
    assert mlp.W_router.shape == (cfg.d_model, cfg.num_experts)
    x = cache["ln2.hook_normalized"]
    assert _close(x @ mlp.W_router, cache["mlp.hook_router_logits"])
    hidden = F.silu(torch.einsum("bpm,emf->bpef", x, mlp.experts_W_gate)) * torch.einsum("bpm,emf->bpef", x, mlp.experts_W_in)
    expected = torch.einsum("bpef,efm->bpem", hidden, mlp.experts_W_out) * cache["mlp.hook_router_weights"][..., None]
    assert _close(expected, cache["mlp.hook_expert_out"])


def test_a_weight_set_to_zero_drops_exactly_that_expert(model, inputs, cache):
    expert = int(cache["mlp.hook_router_weights"][0, -1].argmax())

    def drop(weights, hook):
        weights = weights.clone()
        weights[..., expert] = 0
        return weights

    edited = _mlp_out(model, inputs, f"blocks.{LAYER}.mlp.hook_router_weights", drop)
    assert _close(edited, cache["hook_mlp_out"] - cache["mlp.hook_expert_out"][..., expert, :])
    assert not _close(edited, cache["hook_mlp_out"])


def test_a_weight_given_to_an_unselected_expert_runs_it_for_that_token(model, inputs, cache):
    weights = cache["mlp.hook_router_weights"]
    expert = int(weights[1, -1].argmin())  # not selected for the last token of row 1
    assert weights[1, -1, expert] == 0

    def add(weights, hook):
        weights = weights.clone()
        weights[1, -1, expert] = 0.5
        return weights

    edited = _mlp_out(model, inputs, f"blocks.{LAYER}.mlp.hook_router_weights", add)
    x = cache["ln2.hook_normalized"][1, -1:]
    expected = cache["hook_mlp_out"][1, -1] + 0.5 * model.blocks[LAYER].mlp.expert(x, expert)[0]
    assert _close(edited[1, -1], expected)
    untouched = torch.ones(edited.shape[:2], dtype=torch.bool)
    untouched[1, -1] = False
    assert torch.equal(edited[untouched], cache["hook_mlp_out"][untouched])


@pytest.mark.parametrize("how", ["returned", "in place"])
def test_expert_out_edits_reach_the_output(model, inputs, cache, how):
    expert = int(cache["mlp.hook_router_weights"][0, 3].argmax())

    def edit(expert_out, hook):
        out = expert_out.clone() if how == "returned" else expert_out
        out[..., expert, :] = 0
        return out if how == "returned" else None

    edited = _mlp_out(model, inputs, f"blocks.{LAYER}.mlp.hook_expert_out", edit)
    assert _close(edited, cache["hook_mlp_out"] - cache["mlp.hook_expert_out"][..., expert, :])


def test_expert_out_is_not_computed_unless_used(model, inputs, monkeypatch):
    def forbidden(self, *args):
        raise AssertionError("hook_expert_out computed without a consumer")

    monkeypatch.setattr(MoEMLP, "_hooked_expert_out", forbidden)
    model(inputs)
    model.run_with_cache(inputs, names_filter=lambda name: "hook_expert_out" not in name)
    with pytest.raises(AssertionError, match="without a consumer"):
        model.run_with_cache(inputs, names_filter=f"blocks.{LAYER}.mlp.hook_expert_out")


@torch.no_grad()
def test_grouped_and_eager_experts_agree(model, inputs, monkeypatch):
    """auto runs all experts in grouped matmuls (here: PyTorch's CPU `F.grouped_mm`), eager one
    expert at a time in expert order, as Hugging Face's eager experts; the same sums reordered."""
    calls = []
    grouped = MoEMLP._grouped_experts
    monkeypatch.setattr(MoEMLP, "_grouped_experts", lambda self, *a: calls.append(1) or grouped(self, *a))
    names = [f"blocks.{l}.hook_mlp_out" for l in range(model.cfg.n_layers)]
    auto_logits, auto = model.run_with_cache(inputs, names_filter=names)
    assert len(calls) == sum(model.cfg.is_moe_layer(l) for l in range(model.cfg.n_layers))
    model.set_attention_implementation("eager")
    try:
        eager_logits, eager = model.run_with_cache(inputs, names_filter=names)
    finally:
        model.set_attention_implementation("auto")
    assert len(calls) == sum(model.cfg.is_moe_layer(l) for l in range(model.cfg.n_layers))  # none more
    for name in names:
        assert _close(auto[name], eager[name], 1e-5 * eager[name].abs().max().item())
    assert _close(auto_logits, eager_logits, 1e-5 * eager_logits.abs().max().item())


def test_gradients_take_the_eager_experts(model, inputs, monkeypatch):
    """Attribution needs gradients through the experts: they run one by one then (grouped_mm's
    CPU backward refuses some gradient layouts)."""
    monkeypatch.setattr(MoEMLP, "_grouped_experts", lambda self, *a: pytest.fail("grouped experts under autograd"))
    leaf = ("hook_embed", lambda x, hook: x.detach().requires_grad_(True))
    with torch.enable_grad():
        logits = model.run_with_hooks(inputs, fwd_hooks=[leaf])
        logits[:, -1].logsumexp(-1).sum().backward()
