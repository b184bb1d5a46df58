"""SAEs on any hook: every on-disk format round-trips through its loader, splicing is exact with
the error term, features are cached, patched and ablated like activations (image tokens
included), splicing can be restricted to token sets, and pickled code is never run."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm import saes
from hooked_vlm.inputs import position_ids_from_mask
from hooked_vlm.testing import real_config
from test_readme import run_example

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module", params=["toy-llava", "toy-internvl"])
def toy(request, photos):
    model = HookedVLM.from_pretrained(request.param)
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is it?", "Describe the animal in this photo please."])
    return model, inputs


@pytest.fixture(scope="module")
def internvl(photos):
    model = HookedVLM.from_pretrained("toy-internvl")
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is it?", "Describe the animal in this photo please."])
    return model, inputs


def random_sae(d_in: int, hook_name: str, architecture: str = "topk", *, d_sae: int = 256, seed: int = 0, **cfg) -> saes.SAE:
    """Random weights scaled so that features fire on some tokens and not on others."""
    g = torch.Generator().manual_seed(seed)
    k = 16 if architecture == "topk" else None
    config = saes.SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, hook_name=hook_name, **cfg)
    threshold = 0.5 * torch.rand(d_sae, generator=g) if architecture == "jumprelu" else None
    return saes.SAE.from_tensors(
        config,
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        0.1 * torch.randn(d_sae, generator=g),
        torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        0.1 * torch.randn(d_in, generator=g),
        threshold,
    )


def _reference_topk(pre: torch.Tensor, k: int, relu: bool) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp(min=0) if relu else values)


# ------------------------------------------------------------------------------ formats
def test_saelens_v6_directory_round_trips_through_the_loader(tmp_path):
    sae = random_sae(64, HOOK, "jumprelu", apply_b_dec_to_input=False)
    tensors = {name: p.detach().clone() for name, p in sae.named_parameters()}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "jumprelu", "d_in": 64, "d_sae": 256, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": HOOK, "model_name": "toy", "sae_lens_version": "6.5.1"}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = saes.load_sae(tmp_path)
    assert loaded.cfg.architecture == "jumprelu" and loaded.cfg.hook_name == HOOK and not loaded.cfg.apply_b_dec_to_input
    for name, tensor in tensors.items():
        assert torch.equal(getattr(loaded, name), tensor)
    x = torch.randn(5, 64)
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    expected = pre * (pre > tensors["threshold"]) * (pre > 0)
    assert torch.equal(loaded.encode(x, hooks=False), expected)


def test_saelens_pre_6_topk_config_round_trips_through_the_loader(tmp_path):
    sae = random_sae(64, HOOK, "topk")
    save_file({name: p.detach().clone() for name, p in sae.named_parameters()}, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 12}, "d_in": 64, "d_sae": 256,
           "hook_name": HOOK, "hook_layer": 1, "dtype": "float32", "apply_b_dec_to_input": True, "sae_lens_training_version": "5.2.0"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = saes.load_saelens(tmp_path)
    assert (loaded.cfg.architecture, loaded.cfg.k, loaded.cfg.signed) == ("topk", 12, False)
    x = torch.randn(5, 64)
    expected = _reference_topk((x - sae.b_dec) @ sae.W_enc + sae.b_enc, 12, relu=True)
    assert torch.equal(loaded.encode(x, hooks=False), expected)


def test_save_saelens_then_load_is_the_same_sae(tmp_path):
    sae = random_sae(64, HOOK, "relu")
    loaded = saes.load_saelens(saes.save_saelens(sae, tmp_path / "out"))
    assert loaded.cfg.architecture == "relu" and loaded.cfg.hook_name == HOOK
    assert all(torch.equal(getattr(loaded, n), p) for n, p in sae.named_parameters())


def test_sparsify_hookpoint_directory_round_trips_through_the_loader(tmp_path):
    d_in, d_sae, k = 64, 256, 8
    g = torch.Generator().manual_seed(3)
    weights = {"encoder.weight": torch.randn(d_sae, d_in, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}  # fmt: skip
    hookpoint = tmp_path / "model.layers.2"  # lmms-lab's LLaVA-NeXT layout: one directory per hookpoint
    hookpoint.mkdir()
    save_file(weights, str(hookpoint / "sae.safetensors"))
    cfg = {"expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": k, "multi_topk": False, "skip_connection": False, "d_in": d_in}
    (hookpoint / "cfg.json").write_text(json.dumps(cfg))
    loaded = saes.load_sae(tmp_path, hookpoint="model.layers.2")
    with pytest.raises(ValueError, match=r"one sparsify SAE per hookpoint: pass hookpoint= one of \['model.layers.2'\]"):
        saes.load_sae(tmp_path)
    assert loaded.cfg.hook_name == "blocks.2.hook_resid_post" and loaded.cfg.d_sae == d_sae
    x = torch.randn(5, d_in)
    acts = _reference_topk(F.relu(F.linear(x - weights["b_dec"], weights["encoder.weight"], weights["encoder.bias"])), k, relu=False)
    assert torch.allclose(loaded.encode(x, hooks=False), acts)
    torch.testing.assert_close(loaded.decode(acts, hooks=False), acts @ weights["W_dec"] + weights["b_dec"], rtol=1e-5, atol=1e-4)
    assert saes.sparsify_hook_name("language_model.model.layers.7.mlp") == "blocks.7.hook_mlp_out"
    assert saes.sparsify_hook_name("vision_tower.vision_model.encoder.layers.3") == "vision.blocks.3.hook_resid_post"


def test_qwen_scope_layer_file_round_trips_through_the_loader(tmp_path):
    d_in, d_sae = 64, 256
    g = torch.Generator().manual_seed(4)
    state = {"W_enc": torch.randn(d_sae, d_in, generator=g), "W_dec": torch.randn(d_in, d_sae, generator=g),
             "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}  # fmt: skip
    directory = tmp_path / "SAE-Res-Toy-W256-L0_20"
    directory.mkdir()
    torch.save(state, directory / "layer3.sae.pt")
    loaded = saes.load_sae(directory / "layer3.sae.pt")
    assert loaded.cfg.hook_name == "blocks.3.hook_resid_post" and (loaded.cfg.k, loaded.cfg.signed) == (20, True)
    x = torch.randn(5, d_in)
    acts = _reference_topk(x @ state["W_enc"].T + state["b_enc"], 20, relu=False)  # Qwen-Scope keeps negative top-k values
    assert torch.allclose(loaded.encode(x, hooks=False), acts)
    # decoded values reach ~200: a different summation order moves them by ~3e-5
    torch.testing.assert_close(loaded.decode(acts, hooks=False), acts @ state["W_dec"].T + state["b_dec"], rtol=1e-5, atol=1e-4)


def test_plain_state_dict_in_linear_layout_round_trips(tmp_path):
    sae = random_sae(64, HOOK, "relu")
    linear = {"encoder.weight": sae.W_enc.T.clone(), "encoder.bias": sae.b_enc.clone(),
              "decoder.weight": sae.W_dec.T.clone(), "decoder.bias": sae.b_dec.clone()}  # fmt: skip
    torch.save(linear, tmp_path / "sae.pt")
    loaded = saes.load_sae(tmp_path / "sae.pt", hook_name=HOOK, architecture="relu")
    assert all(torch.equal(getattr(loaded, n), p) for n, p in sae.named_parameters())
    in_memory = saes.from_state_dict({n: p for n, p in sae.named_parameters()}, hook_name=HOOK)
    assert all(torch.equal(getattr(in_memory, n), p) for n, p in sae.named_parameters())


def test_a_pickle_payload_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "the_payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "layer0.sae.pt"
    torch.save({"W_enc": torch.zeros(4, 2), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="holds code or objects beyond tensors; it was refused unread"):
        saes.load_sae(path, k=2)
    assert not marker.exists()


def test_unsupported_formats_and_options_are_named(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 4, "d_sae": 8, "hook_name": HOOK}))
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(NotImplementedError, match="architecture 'gated'"):
        saes.load_sae(tmp_path)
    with pytest.raises(ValueError, match="no SAE this library reads"):
        saes.load_sae(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="a TopK SAE needs an integer k"):
        saes.SAEConfig(d_in=4, d_sae=8, architecture="topk")


# ------------------------------------------------------------------------------ splicing
@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "topk"])
def test_with_the_error_term_the_spliced_logits_are_the_plain_models(toy, architecture):
    model, inputs = toy
    sae = random_sae(model.cfg.d_model, HOOK, architecture)
    plain = model(inputs)
    spliced = model.run_with_saes(inputs, saes=[sae], use_error_term=True)
    assert (spliced - plain).abs().max() <= 1e-5 and torch.equal(spliced, plain)  # exact by construction
    assert not torch.allclose(model.run_with_saes(inputs, saes=[sae]), plain)  # the reconstruction alone is not


def test_error_term_stays_exact_for_a_bf16_sae_and_a_head_sae(internvl):
    model, inputs = internvl
    plain = model(inputs)
    bf16 = random_sae(model.cfg.d_model, HOOK).to(torch.bfloat16)
    per_head = random_sae(model.cfg.n_heads * model.cfg.d_head, "blocks.2.attn.hook_z", reshape_activations="hook_z")
    logits, cache = model.run_with_cache_with_saes(inputs, saes=[bf16, per_head], use_error_term=True, names_filter=lambda n: "sae_acts_post" in n)
    assert torch.allclose(logits, plain, atol=1e-5)  # the cache forces eager attention: 1e-5, not bits
    assert cache["blocks.2.attn.hook_z.hook_sae_acts_post"].shape == (*inputs.shape, 256)
    assert torch.equal(model.run_with_saes(inputs, saes=[bf16, per_head], use_error_term=True), plain)


def test_error_term_stays_exact_on_a_bf16_model(photos):
    model = HookedVLM.from_pretrained("toy-internvl", dtype=torch.bfloat16)
    inputs = model.prepare(photos["rocket"], "Where is it?")
    sae = random_sae(model.cfg.d_model, HOOK)  # fp32: the SAE computes in its own dtype
    assert torch.equal(model.run_with_saes(inputs, saes=[sae], use_error_term=True), model(inputs))
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], names_filter=[HOOK, f"{HOOK}.hook_sae_recons"])
    assert cache[HOOK].dtype == torch.bfloat16 and cache[f"{HOOK}.hook_sae_recons"].dtype == torch.float32
    assert torch.equal(cache[HOOK], cache[f"{HOOK}.hook_sae_recons"].to(torch.bfloat16))  # without the error term


def test_features_of_image_tokens_are_cached_under_their_hook_names(internvl):
    model, inputs = internvl
    sae = random_sae(model.cfg.d_model, HOOK)
    _, plain_cache = model.run_with_cache(inputs)  # everything, as below: eager attention in both
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)
    names = [f"{HOOK}.{hook}" for hook in saes.SAE_HOOKS]
    assert set(names) <= set(cache.keys())
    layout = inputs.layout
    features = cache[f"{HOOK}.hook_sae_acts_post"][layout.batch, layout.position]
    expected, _ = sae.features_and_reconstruction(plain_cache[HOOK][layout.batch, layout.position])
    assert features.shape == (len(layout), 256) and torch.equal(features, expected)
    assert (features != 0).sum(-1).eq(16).all()  # TopK: k features per image token
    assert not any(name in model.hook_dict for name in names), "the SAE's hooks leave with it"


def test_ablating_a_feature_changes_only_the_positions_where_it_fired(internvl):
    model, inputs = internvl
    sae = random_sae(model.cfg.d_model, HOOK, "relu")
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], names_filter=[HOOK, f"{HOOK}.hook_sae_acts_post"])
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    real = inputs.attention_mask.bool()
    counts = (acts[real] != 0).sum(0)
    feature = int(((counts > 0) & (counts < real.sum())).nonzero()[0])  # fires on some real tokens, not all
    fired = acts[..., feature] != 0

    def ablate(features, hook):
        features[..., feature] = 0.0
        return features

    with model.saes([sae]):
        with model.hooks(fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", ablate)]):
            _, ablated = model.run_with_cache(inputs, names_filter=HOOK)
    changed = (ablated[HOOK] != cache[HOOK]).any(-1)
    assert torch.equal(changed, fired) and fired.any() and not fired.all()


def test_features_are_patched_like_any_activation(internvl, photos):
    model, base = internvl
    source = model.prepare([photos["rocket"].transpose(0), photos["chelsea"].transpose(0)], ["Where is it?", "Describe the animal in this photo please."])
    sae = random_sae(model.cfg.d_model, HOOK)
    image = iv.image_tokens(base)
    with model.saes([sae]):
        patch = iv.activation_patch(model, base, source, f"{HOOK}.hook_sae_acts_post", positions=image)
        _, source_cache = model.run_with_cache(source, names_filter=HOOK)
        with model.hooks(fwd_hooks=patch):
            _, patched = model.run_with_cache(base, names_filter=HOOK)
        _, base_cache = model.run_with_cache(base, names_filter=HOOK)
    assert torch.equal(patched[HOOK][image.mask], source_cache[HOOK][image.mask])  # the source's reconstruction
    assert torch.equal(patched[HOOK][~image.mask], base_cache[HOOK][~image.mask])


def test_splicing_restricted_to_image_tokens_leaves_the_text_tokens_alone(toy):
    model, inputs = toy
    sae = random_sae(model.cfg.d_model, HOOK)
    _, plain = model.run_with_cache(inputs, names_filter=HOOK)
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], tokens="image", names_filter=[HOOK, f"{HOOK}.hook_sae_recons"])
    image = inputs.image_token_mask()
    assert torch.equal(cache[HOOK][image], cache[f"{HOOK}.hook_sae_recons"][image])
    assert torch.equal(cache[HOOK][~image], plain[HOOK][~image])


def test_generation_with_a_spliced_sae_is_a_loop_of_spliced_forwards(internvl):
    """Text-token splicing (generated tokens included) in a KV-cached generate equals it in
    full forwards without a cache; with the error term generation is the plain model's."""
    model, inputs = internvl
    sae = random_sae(model.cfg.d_model, HOOK)
    text = saes.resolve_tokens("text", inputs)
    steps = 4
    with model.saes([sae], tokens=text):
        generated = model.generate(inputs, max_new_tokens=steps, return_tokens=True)
    ids, mask = inputs.input_ids, inputs.attention_mask
    for _ in range(steps):
        step = replace(inputs, input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        with torch.no_grad():
            token = model.run_with_saes(step, saes=[sae], tokens=text)[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated[0], ids[0, inputs.shape[1] :])  # row 0 does not stop early on this toy
    with model.saes([sae], use_error_term=True):
        exact = model.generate(inputs, max_new_tokens=steps, return_tokens=True)
    assert torch.equal(exact, model.generate(inputs, max_new_tokens=steps, return_tokens=True))


def test_an_sae_on_the_vision_tower_restricted_to_image_patches(toy):
    model, inputs = toy
    name = "vision.blocks.0.hook_resid_post"
    sae = random_sae(model.cfg.vision.d_model, name)
    patches = iv.vision_patches(model, inputs)  # the patches under the image tokens, CLS left out
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], tokens=patches, names_filter=[name, f"{name}.hook_sae_recons", f"{name}.hook_sae_input"])
    assert torch.equal(cache[name][patches.mask], cache[f"{name}.hook_sae_recons"][patches.mask])
    assert torch.equal(cache[name][~patches.mask], cache[f"{name}.hook_sae_input"][~patches.mask])
    assert torch.equal(model.run_with_saes(inputs, saes=[sae], use_error_term=True), model(inputs))


def test_splicing_leaves_nothing_behind_even_when_the_call_raises(internvl):
    model, inputs = internvl
    sae = random_sae(model.cfg.d_model, HOOK)
    hooks_before = set(model.hook_dict)

    def explode(tensor, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks_with_saes(inputs, saes=[sae], fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", explode)])
    assert set(model.hook_dict) == hooks_before and not model.hook_dict[HOOK].fwd_hooks
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post" and torch.equal(model.run_with_saes(inputs, saes=[]), model(inputs))


def test_splicing_mistakes_are_named(internvl):
    model, inputs = internvl
    with pytest.raises(ValueError, match="unknown hook name 'blocks.1.hook_resid_pots'"):
        model.run_with_saes(inputs, saes=[random_sae(model.cfg.d_model, "blocks.1.hook_resid_pots")])
    with pytest.raises(ValueError, match="two SAEs are to be spliced at"):
        model.run_with_saes(inputs, saes=[random_sae(model.cfg.d_model, HOOK), random_sae(model.cfg.d_model, HOOK, seed=1)])
    with pytest.raises(ValueError, match=r"the SAE reads 64 features per token but blocks.1.hook_resid_post gives 128"):
        model.run_with_saes(inputs, saes=[random_sae(64, HOOK)])
    with pytest.raises(ValueError, match="tokens='image' needs the inputs"):
        model.saes([random_sae(model.cfg.d_model, HOOK)], tokens="image").__enter__()
    with pytest.raises(ValueError, match="reset_saes_end=False is not supported"):
        model.run_with_saes(inputs, saes=[], reset_saes_end=False)
    with pytest.raises(NotImplementedError, match="never left attached .* `with model.saes"):
        model.add_sae(random_sae(model.cfg.d_model, HOOK))  # SAELens's habit


# ------------------------------------------------------------------------------ report
def test_reconstruction_report_separates_image_and_text_tokens(internvl):
    model, inputs = internvl
    sae = random_sae(model.cfg.d_model, HOOK, "relu")
    report = saes.reconstruction_report(model, inputs, sae)
    image, real = inputs.image_token_mask(), inputs.attention_mask.bool()
    assert report.loc["image", "n_tokens"] == len(inputs.layout) == image.sum()
    assert report.loc["text", "n_tokens"] == (real & ~image).sum()
    _, cache = model.run_with_cache(inputs, names_filter=HOOK)
    x = cache[HOOK][image].double()
    _, recons = sae.features_and_reconstruction(cache[HOOK][image])
    assert report.loc["image", "mse"] == pytest.approx(float((x - recons.double()).pow(2).mean()), rel=1e-9)
    assert report.loc["image", "explained_variance"] == pytest.approx(float(1 - (x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6)
    assert report.loc["all", "n_tokens"] == real.sum() and report.loc["image", "delta_loss"] != 0


def test_a_perfect_sae_reports_no_error_and_no_loss_change(internvl):
    model, inputs = internvl
    d = model.cfg.d_model
    eye = torch.eye(d)
    identity = saes.SAE.from_tensors(  # relu(x) - relu(-x) == x: a lossless ReLU SAE
        saes.SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", apply_b_dec_to_input=False, hook_name=HOOK),
        torch.cat([eye, -eye], 1), None, torch.cat([eye, -eye], 0), None,
    )  # fmt: skip
    report = saes.reconstruction_report(model, inputs, identity)
    assert (report["mse"] == 0).all() and (report["explained_variance"] == 1).all() and (report["delta_loss"] == 0).all()



def test_reconstruction_report_reads_an_original_llava_checkpoint(tiny_checkpoint, photos):
    """Original LLaVA-1.5 keeps its image placeholder, -200, in `input_ids`: no token, never a target."""
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is it?", "Describe the animal in this photo please."])
    assert int(inputs.input_ids.min()) == -200
    report = saes.reconstruction_report(model, inputs, random_sae(model.cfg.d_model, HOOK, "relu"))
    assert report.loc["image", "n_tokens"] == len(inputs.layout)
    assert torch.isfinite(torch.tensor(report[["loss_clean", "loss_spliced"]].to_numpy())).all()

# ------------------------------------------------------------------------------ Qwen-Scope
def test_qwen_scope_releases_map_onto_internvl_3_5_checkpoints():
    repos = {r.repo for r in saes.qwen_scope_releases("OpenGVLab/InternVL3_5-8B-HF")}
    assert repos == {"Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50", "Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_100"}
    assert {r.base_model for r in saes.qwen_scope_releases("OpenGVLab/InternVL3_5-2B")} == {"Qwen/Qwen3-1.7B-Base"}
    assert {r.d_sae for r in saes.qwen_scope_releases("OpenGVLab/InternVL3_5-30B-A3B-HF")} == {32768, 131072}
    assert saes.qwen_scope_releases("OpenGVLab/InternVL3_5-1B") == []  # Qwen3-0.6B: no Qwen-Scope release
    text = real_config("internvl3.5-8b").text_config  # a loaded model is matched by its language model's shape
    model = SimpleNamespace(cfg=SimpleNamespace(family="internvl", text=SimpleNamespace(d_model=text.hidden_size, n_layers=text.num_hidden_layers)))
    assert {r.repo for r in saes.qwen_scope_releases(model)} == repos
    assert saes.qwen_scope_hook_name(20) == "blocks.20.hook_resid_post"


def test_qwen_scope_layer_loads_onto_a_model_that_fits_and_refuses_one_that_does_not(internvl, tmp_path, monkeypatch):
    model, inputs = internvl
    d, d_sae = model.cfg.d_model, 64
    g = torch.Generator().manual_seed(5)
    state = {"W_enc": torch.randn(d_sae, d, generator=g), "W_dec": torch.randn(d, d_sae, generator=g), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)}
    torch.save(state, tmp_path / "layer2.sae.pt")
    sae = saes.load_qwen_scope_layer(tmp_path, layer=2, model=model, k=8)
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post"
    assert torch.equal(model.run_with_saes(inputs, saes=[sae], use_error_term=True), model(inputs))
    with pytest.raises(IndexError, match="layer 9 out of range"):
        saes.load_qwen_scope_layer(tmp_path, layer=9, model=model, k=8)
    with pytest.raises(ValueError, match="was trained on Qwen/Qwen3-8B-Base .* Releases that fit: none"):
        saes.load_qwen_scope_layer("Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50", layer=2, model=model)
    requested = []

    def fake_download(repo, filename):  # the hub, answered from tmp_path
        requested.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    downloaded = saes.load_qwen_scope_layer("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", layer=2)
    assert requested == [("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", "layer2.sae.pt")] and downloaded.cfg.k == 50


def test_readme_example_runs_as_written(internvl, tmp_path):
    model, inputs = internvl
    path = saes.save_saelens(random_sae(model.cfg.d_model, HOOK), tmp_path / "sae")
    ns = run_example("SAEs", {'"path/to/sae"': repr(str(path))}, {"model": model, "inputs": inputs})
    assert ns["image_features"].shape == (len(inputs.layout), 256) and len(ns["texts"]) == len(inputs)
    assert list(ns["report"].index) == ["image", "text", "all"] and torch.equal(ns["logits"], model.run_with_cache(inputs)[0])
