"""The HookedTransformer surface: twenty TransformerLens habits, each checked on both shipped toys
against the value computed by hand (from the weights, the hooks' own activations or the layout)."""

from __future__ import annotations

import json
import re

import circuitsvis as cv
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformer_lens.patching as tl_patching
from PIL import Image
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import get_act_name

from hooked_vlm import HookedVLM
from hooked_vlm.tl_surface import PAD_LABEL
from test_readme import CAT, run_example


@pytest.fixture(scope="module", params=["toy-llava", "toy-internvl"])
def toy(request, photos):
    """A shipped toy, a padded batch of two prompts, and its cache."""
    model = HookedVLM.from_pretrained(request.param)
    inputs = model.prepare([photos["rocket"], photos["chelsea"]], ["Where is it?", "Describe the animal in this photo please."])
    _, cache = model.run_with_cache(inputs)
    return model, inputs, cache


@pytest.fixture(scope="module")
def pair(toy, photos):
    """Clean and corrupted single inputs with one layout (two images of one size), the clean
    cache, and a metric: the last position's logit of the clean run's top token."""
    model = toy[0]
    clean = model.prepare(photos["rocket"], "Where is the rocket?")
    corrupted = model.prepare(photos["rocket"].transpose(0), "Where is the rocket?")  # mirrored: same size
    logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    return clean, corrupted, cache, (lambda out: out[0, -1, token])


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ tokens (1-7)
def test_to_tokens_tokenizes_text_as_the_tokenizer_does(toy):
    model = toy[0]
    ids = model.tokenizer("a cat sat")["input_ids"]
    assert model.to_tokens("a cat sat").tolist() == [ids]
    bos = model.tokenizer.bos_token_id
    if bos is not None:  # LLaVA's Llama tokenizer starts with <s>; prepend_bos=False drops it
        assert ids[0] == bos and model.to_tokens("a cat sat", prepend_bos=False).tolist() == [ids[1:]]
    short = model.tokenizer("a cat")["input_ids"]
    batch = model.to_tokens(["a cat", "a cat sat"], padding_side="left")
    assert batch.shape == (2, len(ids)) and batch[0, -len(short) :].tolist() == short
    assert (batch[0, : -len(short)] == model.tokenizer.pad_token_id).all()


def test_to_tokens_of_inputs_is_their_input_ids(toy):
    model, inputs, _ = toy
    assert torch.equal(model.to_tokens(inputs), inputs.input_ids)


def test_to_string_decodes_one_sequence_or_a_batch(toy):
    model = toy[0]
    ids = model.to_tokens("the red square", prepend_bos=False)
    assert model.to_string(ids[0]) == model.tokenizer.decode(ids[0])
    assert model.to_string(ids) == [model.tokenizer.decode(ids[0])]


def test_to_str_tokens_of_text_decodes_each_token_on_its_own(toy):
    model = toy[0]
    ids = model.to_tokens("the red square")[0].tolist()
    assert model.to_str_tokens("the red square") == [model.tokenizer.decode([i]) for i in ids]
    assert model.to_str_tokens(torch.tensor([ids])) == model.to_str_tokens("the red square")


def test_to_str_tokens_of_inputs_reads_image_tokens_as_their_place_in_the_layout(toy):
    model, inputs, _ = toy
    labels = model.to_str_tokens(inputs)
    layout = inputs.layout
    assert [len(row) for row in labels] == [inputs.input_ids.shape[1]] * len(inputs)
    for i in range(len(layout)):
        row, position = int(layout.batch[i]), int(layout.position[i])
        assert labels[row][position] == f"<img v{int(layout.view[i])} r{int(layout.row[i])} c{int(layout.col[i])}>"
    image = inputs.image_token_mask()
    for row in range(len(inputs)):
        for position in (~image[row] & inputs.attention_mask[row].bool()).nonzero().flatten().tolist():
            assert labels[row][position] == model.to_single_str_token(int(inputs.input_ids[row, position]))


def test_to_str_tokens_of_inputs_marks_left_padding(toy):
    model, inputs, _ = toy
    labels = model.to_str_tokens(inputs)
    for row in range(len(inputs)):
        padding = (inputs.attention_mask[row] == 0).nonzero().flatten().tolist()
        assert [labels[row][p] for p in padding] == [PAD_LABEL] * len(padding)
    assert (inputs.attention_mask == 0).any(), "the fixture's prompts differ in length: one row is padded"



def test_running_token_ids_says_a_vlm_input_is_needed(toy):
    """TransformerLens's `model(tokens)`: ids alone carry no image."""
    model = toy[0]
    tokens = model.to_tokens("a cat")
    for run in (model, model.run_with_cache, lambda t: model.generate(t, 2)):
        with pytest.raises(TypeError, match="HookedVLM runs a VLMInput, not a Tensor: build it with model.prepare"):
            run(tokens)

def test_to_single_token_is_the_tokenizers_one_token_and_refuses_several(toy):
    model = toy[0]
    word = next(w for w in ("the", "a", "is", "red") if len(model.tokenizer.encode(w, add_special_tokens=False)) == 1)
    token = model.to_single_token(word)
    assert [token] == model.tokenizer.encode(word, add_special_tokens=False)
    assert model.to_single_str_token(token) == model.tokenizer.decode([token])
    with pytest.raises(ValueError, match="tokens, not one"):
        model.to_single_token("a whole sentence of many tokens")
    with pytest.raises(TypeError, match="to_single_token takes a string, got int"):
        model.to_single_token(token)



def test_ids_of_an_original_llava_checkpoint_read_its_image_placeholder_as_image(tiny_checkpoint, photos):
    """Original LLaVA-1.5 writes its image placeholder, -200 (no token), into `input_ids`."""
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_original"))
    inputs = model.prepare(photos["chelsea"], "Where is the cat?")
    ids, image = inputs.input_ids[0], inputs.image_token_mask()[0]
    n = int(image.sum())
    labels = model.to_str_tokens(ids)
    assert [labels[p] for p in image.nonzero().flatten().tolist()] == ["<image>"] * n
    by_layout = model.to_str_tokens(inputs)[0]
    assert [labels[p] for p in (~image).nonzero().flatten().tolist()] == [by_layout[p] for p in (~image).nonzero().flatten().tolist()]
    assert model.to_string(ids).endswith("USER: " + "<image>" * n + "\nWhere is the cat? ASSISTANT:")
    assert model.to_string(inputs.input_ids) == [model.to_string(ids)]
    with pytest.raises(ValueError, match="token id -3 is negative"):
        model.to_str_tokens(torch.tensor([5, -3]))

def test_get_token_position_indexes_the_inputs_activations(toy):
    model, inputs, _ = toy
    row = inputs.input_ids[1:]
    token = int(row[0, -1])
    last = model.get_token_position(token, row, mode="last")
    assert last == row.shape[1] - 1
    first = model.get_token_position(token, row)
    assert int(row[0, first]) == token and first == int((row[0] == token).nonzero()[0])
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(model.cfg.image_token_id if model.cfg.image_token_id < model.cfg.d_vocab else 0, model.to_tokens("no"))


# ------------------------------------------------------------------------------ weights (8-14)
def test_stacked_attention_weights_reproduce_each_layers_q_k_v_and_result(toy):
    model, _, cache = toy
    assert model.W_Q.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head)
    rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    for layer in range(model.cfg.n_layers):
        x = cache["normalized", layer, "ln1"]
        _close(torch.einsum("bpm,hmd->bphd", x, model.W_Q[layer]) + model.b_Q[layer], cache["q", layer])
        _close((torch.einsum("bpm,hmd->bphd", x, model.W_K[layer]) + model.b_K[layer])[:, :, ::rep], cache["k", layer])
        _close((torch.einsum("bpm,hmd->bphd", x, model.W_V[layer]) + model.b_V[layer])[:, :, ::rep], cache["v", layer])
        result = torch.einsum("bphd,hdm->bpm", cache["z", layer], model.W_O[layer]) + model.b_O[layer]
        _close(result, cache["attn_out", layer])


def test_stacked_mlp_weights_reproduce_the_mlp(toy):
    model, _, cache = toy
    assert model.W_in.shape == model.W_gate.shape == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp)
    for layer in range(model.cfg.n_layers):
        x = cache["normalized", layer, "ln2"]
        _close(x @ model.W_gate[layer], cache["pre", layer])  # gated: hook_pre is the gate's input to the activation
        _close(x @ model.W_in[layer] + model.b_in[layer], cache["pre_linear", layer])
        _close(cache["post", layer] @ model.W_out[layer] + model.b_out[layer], cache["mlp_out", layer])
    assert model.vision.W_gate is None  # plain MLP, as TransformerLens answers for one
    x = cache["vision.blocks.0.ln2.hook_normalized"]
    _close(x @ model.vision.W_in[0] + model.vision.b_in[0], cache["vision.blocks.0.mlp.hook_pre"])


def test_W_E_and_W_U_embed_the_text_tokens_and_unembed_the_final_residual(toy):
    model, inputs, cache = toy
    _close(model.W_E[inputs.input_ids.clamp(max=model.cfg.d_vocab - 1)][~inputs.image_token_mask()], cache["hook_embed"][~inputs.image_token_mask()])
    logits = cache["ln_final.hook_normalized"] @ model.W_U + model.b_U
    _close(logits, model(inputs))


def test_W_pos_is_the_vision_towers_learned_positions_and_the_language_model_has_none(toy):
    model, _, cache = toy
    assert torch.equal(model.vision.W_pos[None], cache["vision.hook_pos_embed"])
    with pytest.raises(NotImplementedError, match="rotary"):
        model.W_pos


def test_vision_W_E_is_the_patch_convolution_as_a_matrix(toy):
    model, inputs, cache = toy
    tower = model.vision
    patches = F.unfold(inputs.pixel_values, kernel_size=tower.cfg.patch_size, stride=tower.cfg.patch_size).transpose(1, 2)
    bias = tower.patch_embed.bias if tower.patch_embed.bias is not None else 0
    _close(patches @ tower.W_E + bias, cache["vision.hook_patch_embed"])


def test_OV_is_the_factored_product_of_W_V_and_W_O_per_query_head(toy):
    model = toy[0]
    ov = model.OV
    assert isinstance(ov, FactoredMatrix) and ov.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    layer, head = model.cfg.n_layers - 1, model.cfg.n_heads - 1
    v_proj = model.blocks[layer].attn.v_proj.weight.view(model.cfg.n_key_value_heads, model.cfg.d_head, -1)
    o_proj = model.blocks[layer].attn.o_proj.weight.view(model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head)
    by_hand = v_proj[head // rep].T @ o_proj[:, head].T  # query head h reads key/value head h // rep
    _close(ov.AB[layer, head], by_hand)
    _close(model.vision.OV.AB, model.vision.W_V @ model.vision.W_O)


def test_QK_is_the_factored_product_of_W_Q_and_W_K_transposed(toy):
    model = toy[0]
    qk = model.QK
    _close(qk.AB, model.W_Q @ model.W_K.transpose(-2, -1))
    assert qk.ndim == 4 and qk[0, 0].rdim == model.cfg.d_model  # FactoredMatrix's own indexing
    singular = qk[0, 0].S
    assert len(singular) == model.cfg.d_head  # rank d_head, as the factorisation says


# ------------------------------------------------------------------------------ names (15-17)
LM_NAMES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "z", "result", "pattern", "attn_scores", "rot_q", "rot_k", "pre", "post", "pre_linear"]


def test_get_act_name_resolves_to_the_hooks_of_both_towers(toy):
    model = toy[0]
    for name in LM_NAMES:
        assert get_act_name(name, 0) in model.hook_dict, name
    assert get_act_name("normalized", 1, "ln2") in model.hook_dict
    assert {get_act_name("embed"), get_act_name("normalized")} <= set(model.hook_dict)  # hook_embed, ln_final
    for name in ["resid_pre", "resid_post", "q", "z", "result", "pattern", "pre", "post"]:
        assert "vision." + get_act_name(name, 0) in model.hook_dict, name
    assert "vision." + get_act_name("pos_embed") in model.hook_dict


def test_cache_indexing_by_short_name_and_layer(toy):
    model, _, cache = toy
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["resid_post", -1], cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape[0] == model.cfg.n_layers * model.cfg.n_heads and labels[0] == "L0H0"


def test_run_with_hooks_by_act_name_ablates_a_head(toy):
    model, inputs, cache = toy

    def zero_head(z, hook):
        z[:, :, 0] = 0.0
        return z

    expected_attn_out = cache["attn_out", 0] - torch.einsum("bpd,dm->bpm", cache["z", 0][:, :, 0], model.W_O[0, 0])
    with model.hooks(fwd_hooks=[(get_act_name("z", 0), zero_head)]):
        _, ablated_cache = model.run_with_cache(inputs, names_filter=get_act_name("attn_out", 0))
    _close(ablated_cache["attn_out", 0], expected_attn_out)


# ------------------------------------------------------------------------------ patching (18-19)
def test_transformer_lens_resid_pre_patching_runs_on_inputs_and_matches_a_hand_patch(toy, pair):
    """TransformerLens's own sweep over (layer, position) cells; a few cells (`index_df`, its
    option) keep the test short: the full sweep is n_layers x pos forwards of the same code."""
    model = toy[0]
    clean, corrupted, clean_cache, metric = pair
    layer, position = 1, int(clean.layout.position[len(clean.layout) // 2])  # an image token
    cells = pd.DataFrame({"layer": [0, layer, model.cfg.n_layers - 1], "pos": [0, position, corrupted.shape[1] - 1]})
    result = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, index_axis_names=None, index_df=cells)
    assert result.shape == (3,)
    for cell, (layer, position) in enumerate(zip(cells["layer"], cells["pos"])):

        def patch(resid, hook, position=position):
            resid[:, position] = clean_cache[hook.name][:, position]
            return resid

        by_hand = metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)]))
        _close(result[cell], by_hand)
    assert not torch.isclose(result[1], metric(model(corrupted))), "the patched image token matters"


def test_transformer_lens_head_patching_sweeps_run_on_inputs_and_match_a_hand_patch(toy, pair):
    model = toy[0]
    clean, corrupted, clean_cache, metric = pair
    out = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    keys = tl_patching.get_act_patch_attn_head_k_all_pos(model, corrupted, clean_cache, metric)
    assert out.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert keys.shape == (model.cfg.n_layers, model.cfg.n_key_value_heads)  # GQA: one entry per key/value head

    def patch(z, hook):
        z[:, :, 1] = clean_cache[hook.name][:, :, 1]
        return z

    _close(out[2, 1], metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.2.attn.hook_z", patch)])))


def test_direct_path_patching_says_what_it_would_need(toy, pair):
    model = toy[0]
    clean, corrupted, clean_cache, metric = pair
    with pytest.raises(NotImplementedError, match="no per-head copies of the residual stream before Q/K/V"):
        tl_patching.get_act_patch_direct_path(model, corrupted, clean_cache, clean_cache, metric, 0, 0, verbose=False)


# ------------------------------------------------------------------------------ viewers (20-21)
def test_circuitsvis_draws_attention_over_to_str_tokens(toy):
    model, inputs, cache = toy
    labels = model.to_str_tokens(inputs)[1]
    pattern = cache["pattern", 0][1]
    html = str(cv.attention.attention_patterns(tokens=labels, attention=pattern))
    props = json.loads(re.search(r'(\{"tokens".*\})\s*\)', html, re.DOTALL).group(1))  # what the viewer draws
    assert props["tokens"] == labels and "<img v0 r0 c0>" in labels
    _close(torch.tensor(props["attention"]), pattern)


def test_vision_to_str_tokens_labels_every_tower_position_of_every_view(toy):
    model, inputs, cache = toy
    labels = model.vision.to_str_tokens(inputs)
    n_grid = model.cfg.vision.n_grid
    assert len(labels) == inputs.pixel_values.shape[0]
    assert [len(view) for view in labels] == [cache["vision.blocks.0.hook_resid_pre"].shape[1]] * len(labels)
    assert labels[0][0] == "<cls i0 v0>" and labels[0][1 + 2 * n_grid + 3] == "<patch i0 v0 r2 c3>"
    assert labels[-1][0] == f"<cls i1 v{len(inputs.layout.views[1]) - 1}>"


def test_moe_mlps_have_no_single_W_in(toy, monkeypatch):
    model = toy[0]

    class Experts(torch.nn.Module):  # what a mixture-of-experts MLP looks like: weights per expert
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Parameter(torch.zeros(2, 3))

    monkeypatch.setattr(model.blocks[1], "mlp", Experts())
    with pytest.raises(NotImplementedError, match="blocks.1.mlp is a Experts, which has no single W_in: read its own weights \\(experts\\)"):
        model.W_in


def test_readme_example_runs_as_written():
    ns = run_example(
        "Coming from TransformerLens",
        {'"OpenGVLab/InternVL3_5-2B-HF"': '"toy-internvl"', '"cat.jpg"': repr(str(CAT)), '"cat_mirrored.jpg"': "mirrored"},
        {"HookedVLM": HookedVLM, "mirrored": Image.open(CAT).transpose(0)},
    )
    model = ns["model"]
    assert ns["per_head"].shape == (model.cfg.n_layers, model.cfg.n_heads) and isinstance(ns["ov"], FactoredMatrix)
    assert ns["labels"][ns["position"]] == "?" and ns["patches"][0] == "<cls v0>" and isinstance(ns["word"], str)
