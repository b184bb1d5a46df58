"""The shipped toy checkpoints: they load offline by name, reload bit-identically, are the
Hugging Face models numerically, were trained on exactly the inputs `prepare` makes, and meet the
quality floor on held-out synthetic items. No training here: the checkpoints are package data."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import AutoConfig, InternVLForConditionalGeneration, LlavaForConditionalGeneration

from hooked_vlm import HookedVLM
from hooked_vlm.data import prompts
from hooked_vlm.parity import check_parity
from hooked_vlm.testing import load_hf_processor
from hooked_vlm.toy_models import available_toy_models, toy_dataset, toy_model_path
from hooked_vlm.toy_models.data import IGNORE_INDEX, ToyEncoder
from hooked_vlm.toy_models.evaluate import evaluate, hooked_generate
from hooked_vlm.toy_models.spec import TOY_SPECS

FAMILIES = ("llava", "internvl")
HF_CLASSES = {"llava": LlavaForConditionalGeneration, "internvl": InternVLForConditionalGeneration}
FLOOR_ITEMS = 40
LOC_FLOOR, CLASSIFICATION_FLOOR = 0.8, 0.95
MAX_CHECKPOINT_BYTES = 10 * 2**20


def _name(family: str) -> str:
    return TOY_SPECS[family].name


def _record(family: str) -> dict:
    return json.loads((toy_model_path(_name(family)) / "training.json").read_text())


def _heldout_items(family: str, n: int, split: str = "test"):
    """Items of a split the model never saw (training used "train", its own eval "val"), from
    the distribution its training record names."""
    return list(toy_dataset(_name(family), n, seed=_record(family)["seed"], split=split))


@pytest.fixture(scope="module")
def hooked() -> Callable[[str], HookedVLM]:
    """`get(family)`: the family's toy as a HookedVLM, loaded by name once for the module."""
    cache: dict[str, HookedVLM] = {}

    def get(family: str) -> HookedVLM:
        if family not in cache:
            cache[family] = HookedVLM.from_pretrained(_name(family))
        return cache[family]

    return get


def test_both_toys_are_shipped_and_small():
    assert {"toy-llava", "toy-internvl"} <= set(available_toy_models())
    for family in FAMILIES:
        path = toy_model_path(_name(family))
        weights = path / "model.safetensors"
        assert weights.is_file() and weights.stat().st_size < MAX_CHECKPOINT_BYTES
        assert AutoConfig.from_pretrained(path).model_type == family


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_by_name(family, monkeypatch):
    """HookedVLM by name, transformers (model, processor) from the shipped directory, hub off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = HookedVLM.from_pretrained(_name(family))
    assert model.cfg.family == family and model.tokenizer.eos_token is not None
    path = toy_model_path(_name(family))
    hf = HF_CLASSES[family].from_pretrained(path)
    assert sum(p.numel() for p in hf.parameters()) == _record(family)["n_parameters"]
    assert load_hf_processor(path).tokenizer.get_vocab() == model.tokenizer.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_two_loads_are_bit_identical(family, hooked):
    first, second = hooked(family), HookedVLM.from_pretrained(_name(family))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    item = _heldout_items(family, 1)[0]
    inputs = first.prepare(item.image, prompts.localization_prompt(item.class_name))
    with torch.no_grad():
        assert torch.equal(first(inputs), second(inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hugging_face(family, hooked):
    items = _heldout_items(family, 2)
    report = check_parity(
        toy_model_path(_name(family)),
        images=[i.image for i in items],
        prompts=[prompts.localization_prompt(items[0].class_name), prompts.list_prompt(items[1].list_choices)],
        max_new_tokens=30,
        verbose=False,
        hooked=hooked(family),
    )
    assert report.max_rel() < 1e-5, str(report)
    assert report.generation_match, str(report)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_inputs_equal_prepare(family, hooked):
    """The encoder the toys were trained with makes the ids and pixels `prepare` makes."""
    model = hooked(family)
    processor = load_hf_processor(toy_model_path(_name(family)))
    encoder = ToyEncoder(family, processor, model.cfg.image_token_id, TOY_SPECS[family].max_tiles)
    for item in _heldout_items(family, 3):
        example = item.examples(family)[0]
        encoded = encoder.encode(example)
        inputs = model.prepare(example.image, example.prompt)
        n_prompt = sum(label == IGNORE_INDEX for label in encoded.labels)
        assert encoded.input_ids[:n_prompt] == inputs.input_ids[0].tolist()
        assert torch.equal(encoded.pixel_values, inputs.pixel_values)
        answer = model.tokenizer.decode(encoded.input_ids[n_prompt:], skip_special_tokens=False)
        assert answer.strip() == example.answer + model.tokenizer.eos_token


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_spells_numbers_digit_by_digit(family, hooked):
    tokenizer = hooked(family).tokenizer
    answer = prompts.localization_answer((3, 5, 40, 27), (64, 32), "red circle", family=family)
    pieces = [p for p in tokenizer.convert_ids_to_tokens(tokenizer(answer).input_ids) if any(c.isdigit() for c in p)]
    assert pieces and all(len(p.strip("▁Ġ")) == 1 for p in pieces)


@pytest.mark.parametrize("family", FAMILIES)
def test_meets_quality_floor_on_heldout_items(family, hooked):
    """Greedy decoding through HookedVLM on items of a split never used in training, and the
    150 held-out items its training run scored (its record)."""
    recorded = _record(family)["heldout_hooked"]
    assert recorded["n_items"] >= 150
    items = _heldout_items(family, FLOOR_ITEMS)
    metrics = evaluate(hooked_generate(hooked(family), batch_size=20), items, family)
    for scores in (recorded, metrics):
        assert scores["loc_success@0.5"] >= LOC_FLOOR, scores
        assert scores["list_accuracy"] >= CLASSIFICATION_FLOOR, scores
        assert scores["binary_accuracy"] >= CLASSIFICATION_FLOOR, scores


@pytest.mark.parametrize("family", FAMILIES)
def test_training_record_is_complete_and_both_decoders_agree(family):
    """training.json holds the run's held-out metrics from transformers' generate and from
    HookedVLM on the same items; the two greedy decoders give the same numbers."""
    record = _record(family)
    assert record["heldout"]["n_items"] >= 100 and np.isfinite(record["final_loss"])
    hf, ours = record["heldout"], record["heldout_hooked"]
    assert hf["n_items"] == ours["n_items"]
    for key in ("loc_success@0.5", "loc_success@0.7", "loc_success@0.9", "list_accuracy", "binary_accuracy"):
        assert abs(hf[key] - ours[key]) <= 2 / hf["n_items"], (key, hf[key], ours[key])


def test_training_script_runs_resumes_and_is_deterministic(tmp_path):
    """A few steps of the real recipe through the command line, twice (bit-identical weights),
    then a second stage with `--init-from`, overridden data and the auxiliary shape loss, twice
    (bit-identical again), whose record keeps the first."""
    from safetensors.torch import load_file

    from hooked_vlm.toy_models.train import main

    common = ["--family", "llava", "--seed", "0", "--threads", "1", "--steps", "2", "--eval-items", "2", "--batch-size", "2"]
    main([*common, "--out", str(tmp_path / "a")])
    main([*common, "--out", str(tmp_path / "b")])
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    stage = ["--init-from", str(tmp_path / "a"), "--image-sizes", "24x32", "--task-weights", "0,1,0", "--lr", "1e-4", "--crowded-share", "0.5",
             "--shape-probe", "1.0"]
    main([*common, *stage, "--out", str(tmp_path / "c")])
    main([*common, *stage, "--out", str(tmp_path / "c2")])  # a continued stage, auxiliary head included, repeats too
    third, fourth = load_file(tmp_path / "c" / "model.safetensors"), load_file(tmp_path / "c2" / "model.safetensors")
    assert all(torch.equal(third[k], fourth[k]) for k in third) and not all(torch.equal(first[k], third[k]) for k in first)
    record = json.loads((tmp_path / "c" / "training.json").read_text())
    assert record["first_step"] == 2 and len(record["stages"]) == 1
    assert record["spec"]["data"]["image_sizes"] == [[24, 32]] and record["spec"]["train"]["task_weights"] == [0, 1, 0]
    assert record["spec"]["train"]["crowded_share"] == 0.5 and record["spec"]["train"]["shape_probe"] == 1.0
    assert all("loss_shape_probe" in entry for entry in record["history"])
    earlier = record["stages"][0]
    assert earlier["steps"] == 2 and earlier["spec"]["data"]["image_sizes"] != [[24, 32]]
    assert {item.image_size for item in toy_dataset(tmp_path / "c", 5)} == {(24, 32)}
    with pytest.raises(SystemExit):
        main([*common, "--image-sizes", "24by32", "--out", str(tmp_path / "d")])


def test_crowded_items_hold_a_distractor_and_come_from_their_own_split():
    from hooked_vlm.toy_models.train import crowded_items

    spec = TOY_SPECS["llava"]
    first, again = crowded_items(spec, 0), crowded_items(spec, 0)
    items = [next(first) for _ in range(20)]
    assert all(len(item.objects) > 1 and item.split == "train-crowded" for item in items)
    assert [item.index for item in items] == [next(again).index for _ in range(20)]
    assert len({item.index for item in items}) == 20


def test_shape_negatives_ask_for_the_targets_colour_in_an_absent_shape():
    from hooked_vlm.toy_models.data import pick_example

    spec = TOY_SPECS["llava"]
    items = list(spec.data.dataset(40, 0, "test"))
    rng = np.random.default_rng(0)
    n_no = 0
    for item in items:  # with shape_negatives=1 every No names the target's colour in a shape absent from the image
        present = {o.class_name for o in item.objects}
        allowed = {prompts.binary_prompt(f"{item.colour} {s}") for s in spec.data.shapes if f"{item.colour} {s}" not in present}
        for _ in range(4):
            example = pick_example(item, "llava", rng, (0, 0, 1), 1.0, spec.data.shapes)
            if example.answer == prompts.NO and allowed:  # (else it falls back to the item's own negatives)
                n_no += 1
                assert example.prompt in allowed and not example.object_removed, (item.class_name, present, example.prompt)
            elif example.answer == prompts.YES:
                assert example.prompt == prompts.binary_prompt(item.class_name)
    assert n_no >= 40
    # off (the default), the draws are the earlier recipe's: the same rng stream gives the same examples
    a = [pick_example(i, "llava", np.random.default_rng(1), (1, 1, 1)) for i in items]
    b = [pick_example(i, "llava", np.random.default_rng(1), (1, 1, 1), 0.0, spec.data.shapes) for i in items]
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_shape_probe_labels_follow_the_image_token_map(hooked, family):
    """The auxiliary shape loss labels a token with an object's shape only where that object's
    mask lies (`layout.mask_to_positions`, over every view), background only where no object
    does, and nothing of the target on its removed twin; it reads the projector output the
    language model gets, token for token."""
    from hooked_vlm.toy_models.data import collate
    from hooked_vlm.toy_models.train import ShapeProbe

    spec = TOY_SPECS[family]
    hf_class = LlavaForConditionalGeneration if family == "llava" else InternVLForConditionalGeneration
    hf = hf_class.from_pretrained(toy_model_path(_name(family)))
    probe = ShapeProbe(hf, spec, seed=0)
    background, n_shape_tokens = len(spec.data.shapes), 0
    items = list(spec.data.dataset(12, 0, "test"))
    assert any(len(i.objects) > 1 for i in items) and {i.image_size for i in items} == set(spec.data.image_sizes)
    for item in items:
        layout = hooked(family).prepare(item.image, prompts.localization_prompt(item.class_name)).layout
        positions = layout.positions(0).tolist()
        covered = [set(layout.mask_to_positions(o.mask).tolist()) for o in item.objects]
        for removed in (False, True):
            labels = probe.labels(item, removed).tolist()
            objects = item.objects[1:] if removed else item.objects
            assert len(labels) == len(positions)
            for position, label in zip(positions, labels):
                if label == background:
                    assert not any(position in c for c in covered[int(removed):])
                elif label != IGNORE_INDEX:
                    n_shape_tokens += 1
                    owners = [o for o, c in zip(objects, covered[int(removed):]) if position in c]
                    assert spec.data.shapes[label] in {o.shape for o in owners}
            assert removed or item.shape in {spec.data.shapes[label] for label in labels if 0 <= label < background}
    assert n_shape_tokens > 100

    encoder = ToyEncoder(family, load_hf_processor(toy_model_path(_name(family))), hf.config.image_token_id, spec.max_tiles)
    pair = [items[0], items[1]]
    examples = [pair[0].examples(family)[0], pair[1].examples(family)[2]]  # an image, a removed twin
    assert [e.object_removed for e in examples] == [False, True]
    batch = collate([encoder.encode(e) for e in examples], encoder.tokenizer.pad_token_id)
    hf(**batch.model_inputs())
    n_tokens = sum(len(probe.labels(item, e.object_removed)) for item, e in zip(pair, examples))
    assert probe.features.shape[-1] == hf.config.text_config.hidden_size
    assert probe.features.numel() == n_tokens * hf.config.text_config.hidden_size
    loss = probe.loss(pair, batch.object_removed)
    loss.backward()
    assert batch.object_removed == [False, True] and torch.isfinite(loss)
    assert hf.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0  # it trains the features
    probe.remove()
    other = "internvl" if family == "llava" else "llava"
    with pytest.raises(ValueError, match=f"a {other} spec needs a {other} model"):
        ShapeProbe(hf, TOY_SPECS[other], seed=0)


def test_head_dropout_zeroes_whole_heads_in_training_mode_only():
    from hooked_vlm.toy_models.train import head_dropout_hooks

    model = LlavaForConditionalGeneration.from_pretrained(toy_model_path("toy-llava"))
    attn = model.model.language_model.layers[0].self_attn
    handles = head_dropout_hooks(model, 0.5, torch.Generator().manual_seed(0))
    seen = []  # what o_proj receives, after the dropout hook
    attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(8, 5, model.config.text_config.hidden_size)
    positions = torch.arange(5).expand(8, 5)
    rotary = model.model.language_model.rotary_emb(x, positions)
    attn.train()
    attn(x, rotary, None)
    heads = seen[-1].view(8, 5, attn.config.num_attention_heads, -1)
    zero = (heads == 0).all(dim=-1)  # [batch, pos, head]
    assert zero.any() and (~zero).any()
    assert (zero == zero[:, :1]).all()  # a dropped head is dropped at every position of its example
    attn.eval()
    attn(x, rotary, None)
    assert not (seen[-1].view_as(heads) == 0).all(dim=-1).any()
    for handle in handles:
        handle.remove()
