"""The README's Python examples run as written, on the shipped toy model instead of a 7B one.

Each example is taken from README.md under its heading; only the names a reader supplies (the
checkpoint, the device, a photo, COCO paths, layer and head numbers of a 32-layer model) are
substituted, and each substitution must still match the README, so an edited example cannot
silently drop out of the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.data.prompts import localization_answer
from hooked_vlm.toy_models import available_toy_models, toy_dataset

matplotlib.use("Agg")
README = Path(__file__).parents[1] / "README.md"
CAT = Path(__file__).parent / "assets" / "chelsea.jpg"  # 451 x 300: the example's box fits
pytestmark = pytest.mark.skipif("toy-llava" not in available_toy_models(), reason="needs the shipped toy-llava")


def example(heading: str) -> str:
    """The first ```python block after `## {heading}`."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def run_example(heading: str, substitutions: dict[str, str], namespace: dict) -> dict:
    code = example(heading)
    for old, new in substitutions.items():
        assert old in code, f"the README's {heading!r} example no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def toy():
    return HookedVLM.from_pretrained("toy-llava")


def test_from_an_image_to_a_head_heat_map():
    ns = run_example(
        "From an image to a head heat-map",
        {
            '"llava-hf/llava-1.5-7b-hf", dtype=torch.bfloat16, device="cuda"': '"toy-llava"',
            'prepare("cat.jpg"': f"prepare({str(CAT)!r}",
            "plotting.head_heatmap(": "figure = plotting.head_heatmap(",
        },
        {},
    )
    model, attention = ns["model"], ns["attention_to_cat"]
    assert attention.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert ((attention > 0) & (attention <= 1 + 1e-6)).all()  # a share of each head's attention
    assert ns["figure"].axes and len(ns["cat"]) > 0


def test_first_five_minutes_runs_as_written():
    ns = run_example("First five minutes", {"plotting.head_heatmap(": "figure = plotting.head_heatmap("}, {})
    model, to_object = ns["model"], ns["to_object"]
    assert to_object.shape == (model.cfg.n_layers, model.cfg.n_heads) and ns["figure"].axes
    assert ns["iou"](ns["parse_box"](ns["answer"], ns["item"].image.size, family="llava"), ns["item"].box) > 0.9  # as the README says


def test_interventions_example(toy):
    item = toy_dataset("toy-llava", 4, split="test")[0]
    prompt = f"Please provide the bounding box coordinates of the {item.class_name}."
    answer = localization_answer(item.box, item.image.size, item.class_name, family="llava", frame="padded")
    base = toy.prepare(item.removed_image, prompt, answers=answer)
    namespace = {
        "model": toy,
        "inputs": toy.prepare(item.image, prompt),
        "box": item.box,
        "imagenet_images": [x.image for x in toy_dataset("toy-llava", 8, split="mean")],
        "base": base,
        "source": toy.prepare(item.image, prompt, answers=answer),
        "prompt_tokens": iv.after_image(base, include_generated=False) - iv.answer_tokens(base),
        "base_with_answers": base,
    }
    last_layer = toy.cfg.n_layers - 1
    ns = run_example(
        "Interventions",
        {"layers=range(8, 12)": f"layers=range(0, {last_layer + 1})", "[(14, 3)]": f"[({last_layer}, 0)]"},
        namespace,
    )
    assert len(ns["texts"]) == 1 and torch.isfinite(ns["nll"]).all()
    assert ns["obj"].mask.sum() > 0 and ns["ablate"] and ns["control"] and ns["block"] and ns["vision"] and ns["shuffle"] and ns["patch"]


def test_experiments_example(toy, tmp_path):
    annotations = toy_dataset("toy-llava", 6, split="test").export_coco(tmp_path)
    ns = run_example(
        "Experiments",
        {
            'load_coco("instances_val2017.json", "val2017/")': f"load_coco({str(annotations)!r}, {str(tmp_path / 'images')!r}, min_area=0, max_area=1, min_short_side=0)",
            'pair_with_removed(data, "inpainted/")': f"pair_with_removed(data, {str(tmp_path / 'removed')!r})",
            "summarize(": "results.append(summarize(",
            "ig\")))": "ig\"), progress=False)))",
            '"localization"))': '"localization", progress=False)))',
            '(4, "all")))': '(2, "all"), progress=False)))',
            'method="exact"))': 'method="exact", progress=False))',
            'low_importance_from="localization")': 'low_importance_from="localization", progress=False)',
        },
        {"model": toy, "results": []},
    )
    assert len(ns["data"]) >= 4 and len(ns["pairs"]) >= 4
    from hooked_vlm.experiments import evaluate, summarize

    # the pairs keep the dataset's classes: the list prompt runs on them too
    assert ns["pairs"].class_names == ns["data"].class_names
    assert len(summarize(evaluate(toy, ns["pairs"], "list", progress=False))) == 1
    assert all(len(summary) > 0 for summary in ns["results"]) and ns["mf"].shape == (toy.cfg.n_layers, toy.cfg.n_heads)


def test_parity_example(toy):
    ns = run_example(
        "Parity",
        {
            '"llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda"': '"toy-llava", dtype=torch.bfloat16, hooked=model, verbose=False',
        },
        {"model": HookedVLM.from_pretrained("toy-llava", dtype=torch.bfloat16)},
    )
    assert ns["report"].ok and ns["report"].generation_match is True and ns["report"].dtype == "bfloat16"


def test_loading_from_the_hub_examples_run_as_written_offline(tmp_path, monkeypatch):
    """Both examples, verbatim, on scaled-down copies of the published repositories in a Hugging
    Face cache with HF_HUB_OFFLINE=1 (on this CPU-only machine "auto" places everything on the CPU)."""
    import huggingface_hub.constants as hub_constants

    from hooked_vlm.testing.hub_cache import add_to_hub_cache
    from hooked_vlm.testing.published import build_published

    cache = tmp_path / "hub"
    for repo_id, directory in build_published(tmp_path / "repos", ["OpenGVLab/InternVL3_5-8B-HF", "OpenGVLab/InternVL3_5-38B-HF"]).items():
        add_to_hub_cache(cache, repo_id, directory)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    text = README.read_text()
    section = text[text.index("\n## Loading from the hub, and on several GPUs\n") :].split("\n## ")[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        ns = {"HookedVLM": HookedVLM, "torch": torch}
        exec(compile(block, "README.md (Loading from the hub)", "exec"), ns)
        assert ns["model"].dtype == torch.bfloat16 and ns["model"].hf_device_map == {"": "cpu"}
