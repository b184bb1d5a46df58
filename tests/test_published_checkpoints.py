"""Every published LLaVA-1.5 and dense InternVL-3.5 repository, as published, loads and matches.

Each row of `hooked_vlm.testing.published.PUBLISHED` is built scaled down (real metadata field for
field, special tokens at their real ids, random weights in the published layout), laid out as the
Hugging Face cache lays it out, and loaded by its hub id offline. HF-format rows match
transformers; original-format rows load identical to their HF twin; `prepare()` gives the token ids
of the HF processor (HF rows) or of the original repository's own conversation template
(original rows, implemented here from LLaVA's and InternVL's code); and the full-size published
config builds on the meta device with every key and shape of the real weight index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.parity import check_parity
from hooked_vlm.testing import load_hf_processor
from hooked_vlm.testing.hub_cache import add_to_hub_cache
from hooked_vlm.testing.published import CLIP_REPO, PUBLISHED, build_published, published_repo

HF_ROWS = [r for r, row in PUBLISHED.items() if row.fmt.endswith("-hf")]
ORIGINAL_ROWS = [r for r, row in PUBLISHED.items() if not row.fmt.endswith("-hf")]
QUESTION = "Where is the cat? Answer with a box."
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A Hugging Face cache holding every published repository (and the CLIP tower)."""
    root = tmp_path_factory.mktemp("published")
    cache = tmp_path_factory.mktemp("hub")
    for repo_id, directory in build_published(root).items():
        add_to_hub_cache(cache, repo_id, directory)
    return cache


@pytest.fixture(scope="module")
def load(hub):
    """`load(repo_id, dtype)`: the row loaded by its hub id, offline from the cache (loaded once)."""
    loaded: dict[tuple, HookedVLM] = {}

    def get(repo_id: str, dtype: str = "float32") -> HookedVLM:
        if (repo_id, dtype) not in loaded:
            loaded[repo_id, dtype] = HookedVLM.from_pretrained(repo_id, cache_dir=hub, local_files_only=True, dtype=dtype)
        return loaded[repo_id, dtype]

    return get


def snapshot(hub: Path, repo_id: str) -> Path:
    folder = hub / ("models--" + repo_id.replace("/", "--"))
    return folder / "snapshots" / (folder / "refs" / "main").read_text()


@pytest.mark.parametrize("repo_id", list(PUBLISHED))
def test_loads_by_hub_id_in_the_published_dtype(load, repo_id):
    row = published_repo(repo_id)
    model = load(repo_id, "auto")
    assert model.cfg.checkpoint_format == row.fmt
    assert model.dtype == (torch.float16 if row.fmt.startswith("llava") else torch.bfloat16)
    expected_image_token = {"llava-hf": 32000, "llava-original": -200}.get(row.fmt, 151671)
    assert model.cfg.image_token_id == expected_image_token


def test_original_llava_reads_the_clip_towers_integer_sizes(hub, load):
    clip_config = json.loads((snapshot(hub, CLIP_REPO) / "preprocessor_config.json").read_text())
    assert (clip_config["size"], clip_config["crop_size"]) == (336, 336)
    for repo_id in ("liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b"):
        pre = load(repo_id).preprocessing
        assert (pre.image_size, pre.image_mode, pre.template) == (336, "pad", "vicuna_v1")


@pytest.mark.parametrize("repo_id", HF_ROWS)
def test_hf_rows_match_transformers(hub, load, photos, repo_id):
    square = photos["astronaut"]  # 384 x 384: one 448-px InternVL tile, 576 LLaVA tokens
    report = check_parity(snapshot(hub, repo_id), [square], [QUESTION], max_new_tokens=3, verbose=False, hooked=load(repo_id))
    assert report.ok, str(report)
    assert report.max_rel() <= 1e-5 and report.generation_match and report.auto_generation_match, str(report)


@pytest.mark.parametrize("repo_id", ORIGINAL_ROWS)
def test_original_rows_load_identical_to_their_hf_twin(load, repo_id):
    """In the published dtype: llava-hf's CLIP tower is openai's fp32 tower cast to fp16."""
    original, twin = load(repo_id, "auto"), load(published_repo(repo_id).twin, "auto")
    assert original.cfg.vision == twin.cfg.vision and original.cfg.text.n_layers == twin.cfg.text.n_layers
    ours, theirs = dict(original.named_parameters()), dict(twin.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        expected = theirs[name][: tensor.shape[0]]  # original LLaVA's vocabulary stops before <image>, <pad>
        assert torch.equal(tensor, expected), name


# ----------------------------------------------------------------------------------- prompts
def _conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("repo_id", HF_ROWS)
def test_hf_rows_prompt_ids_equal_the_hf_processor(hub, load, photos, repo_id):
    model, processor = load(repo_id), load_hf_processor(snapshot(hub, repo_id))
    images = [photos["chelsea"], photos["grace_hopper_tall"]]  # 7 and 4 InternVL views
    inputs = model.prepare(images, [QUESTION, "Describe it."])
    texts = [processor.apply_chat_template(_conversation(q), add_generation_prompt=True) for q in (QUESTION, "Describe it.")]
    assert inputs.text == texts
    expected = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(inputs.input_ids, expected["input_ids"]) and torch.equal(inputs.attention_mask, expected["attention_mask"])
    assert torch.equal(inputs.pixel_values, expected["pixel_values"].to(inputs.pixel_values.dtype))


VICUNA_V1_SYSTEM = (  # LLaVA's conv_vicuna_v1
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INTERNVL2_5_SYSTEM = (  # InternVL's conversation.py, template "internvl2_5"
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


def llava_original_ids(tokenizer, question: str, n_image_tokens: int) -> list[int]:
    """LLaVA-1.5's eval path: `conv_vicuna_v1` (two separators " " and "</s>") around
    "<image>\\n" + question, then `tokenizer_image_token` (chunks tokenised apart, each later
    chunk's BOS dropped, IMAGE_TOKEN_INDEX -200 between them), the image index expanded to its features."""
    prompt = f"{VICUNA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += ([-200] if i else []) + chunk[offset:]
    position = ids.index(-200)
    return ids[:position] + [-200] * n_image_tokens + ids[position + 1 :]


def internvl_original_tiles(width: int, height: int, max_num: int = 12, size: int = 448) -> int:
    """InternVL's `dynamic_preprocess`: the closest aspect ratio among grids of 1..max_num tiles
    (a tie goes to the larger grid when the image is large enough), plus a thumbnail."""
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= max_num},
                    key=lambda r: r[0] * r[1])  # fmt: skip
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(width / height - cols / rows)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * size * size * cols * rows):
            best, best_diff = (cols, rows), diff
    blocks = best[0] * best[1]
    return blocks + (blocks > 1)


def internvl_original_ids(tokenizer, question: str, image: Image.Image) -> list[int]:
    """InternVL's `model.chat()`: "<image>\\n" + question in the internvl2_5 template (MPT
    separators, the system message), `<image>` -> `<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>`."""
    prompt = (f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\n{question}<|im_end|>\n"
              "<|im_start|>assistant\n")  # fmt: skip
    n_tiles = internvl_original_tiles(*image.size)
    return tokenizer(prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * n_tiles + "</img>", 1)).input_ids


@pytest.mark.parametrize("repo_id", ORIGINAL_ROWS)
def test_original_rows_prompt_ids_follow_the_original_conversation_template(load, photos, repo_id):
    model = load(repo_id)
    for photo in ("chelsea", "coffee_wide", "astronaut"):
        inputs = model.prepare(photos[photo], QUESTION)
        ids = inputs.input_ids[0].tolist()
        if model.cfg.family == "llava":
            expected = llava_original_ids(model.tokenizer, QUESTION, 576)
        else:
            expected = internvl_original_ids(model.tokenizer, QUESTION, photos[photo])
        assert ids == expected, photo


# ----------------------------------------------------------------------------------- README
def test_the_readme_table_has_every_row():
    text = README.read_text()
    table = text[text.index("\n## Published checkpoints\n") :]
    for repo_id in list(PUBLISHED) + [CLIP_REPO]:
        assert re.search(rf"\|\s*`?{re.escape(repo_id)}`?\s*\|", table), repo_id
