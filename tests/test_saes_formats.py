"""SAELens files as they are found in the wild: configs of older SAELens versions and fields that
change what the SAE computes are read as SAELens reads them, or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hooked_vlm import HookedVLM, saes

D_IN, D_SAE = 32, 64


def _weights(d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),  # rows far from unit norm
        "b_dec": 0.1 * torch.randn(d_in, generator=g),
    }


def _write(directory, cfg: dict, weights: dict[str, torch.Tensor]):
    directory.mkdir()
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def _pre_6_config(hook_name: str, d_in: int = D_IN) -> dict:
    """What SAELens 3-5 wrote: flat hook name, activation_fn_str, no reshape_activations."""
    return {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cuda", "model_name": "toy",
            "hook_name": hook_name, "hook_layer": 1, "hook_head_index": None, "activation_fn_str": "relu",
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0",
            "prepend_bos": True, "context_size": 128, "normalize_activations": "none"}  # fmt: skip


def test_a_pre_6_hook_z_config_flattens_the_heads_as_saelens_did(tmp_path, photos):
    """SAELens before 6 flattened `[head, d_head]` for any hook ending in `_z`; its configs say nothing of it."""
    model = HookedVLM.from_pretrained("toy-internvl")
    hook = "blocks.1.attn.hook_z"
    width = model.cfg.n_heads * model.cfg.d_head
    sae = saes.load_saelens(_write(tmp_path / "z", _pre_6_config(hook, width), _weights(width)))
    assert sae.cfg.reshape_activations == "hook_z"
    inputs = model.prepare(photos["rocket"], "Where is it?")
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], names_filter=f"{hook}.hook_sae_acts_post")
    assert cache[f"{hook}.hook_sae_acts_post"].shape == (*inputs.shape, D_SAE)
    assert saes.load_saelens(_write(tmp_path / "resid", _pre_6_config("blocks.1.hook_resid_post"), _weights())).cfg.reshape_activations == "none"


def test_an_all_ones_scaling_factor_is_dropped_and_another_refused(tmp_path):
    cfg = _pre_6_config("blocks.1.hook_resid_post")
    ones = saes.load_saelens(_write(tmp_path / "ones", cfg, {**_weights(), "scaling_factor": torch.ones(D_SAE)}))
    assert torch.equal(ones.W_enc, _weights()["W_enc"])
    with pytest.raises(NotImplementedError, match="scaling_factor other than ones"):
        saes.load_saelens(_write(tmp_path / "scaled", cfg, {**_weights(), "scaling_factor": torch.full((D_SAE,), 2.0)}))
    with pytest.raises(NotImplementedError, match=r"weights \['b_gate'\] are not part of a relu SAE"):
        saes.load_saelens(_write(tmp_path / "extra", cfg, {**_weights(), "b_gate": torch.zeros(D_SAE)}))


def test_a_topk_sae_rescaled_by_its_decoder_norm_computes_as_saelens(tmp_path):
    """SAELens's TopK with `rescale_acts_by_decoder_norm`: pre-activations times each feature's
    decoder norm before TopK, activations divided by it before decoding."""
    w = _weights()
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 6, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "rescale_acts_by_decoder_norm": True,
           "metadata": {"hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "6.12.0"}}  # fmt: skip
    sae = saes.load_saelens(_write(tmp_path / "topk", cfg, w))
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(1))
    norm = w["W_dec"].norm(dim=-1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norm
    values, indices = pre.topk(6, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
    features, recons = sae.features_and_reconstruction(x)
    torch.testing.assert_close(features, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recons, (acts / norm) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-4)
    with pytest.raises(NotImplementedError, match="rescale_acts_by_decoder_norm is supported for TopK SAEs only"):
        saes.load_saelens(_write(tmp_path / "relu", {**cfg, "architecture": "standard"}, w))


def test_a_topk_config_without_k_is_named(tmp_path):
    cfg = {**_pre_6_config("blocks.1.hook_resid_post"), "activation_fn_str": "topk"}
    with pytest.raises(ValueError, match="a TopK SAE whose config gives no k"):
        saes.load_saelens(_write(tmp_path / "nok", cfg, _weights()))
