"""Writing scaled-down copies of the published repositories: real metadata, random weights.

Each repository gets its published config (scaled down, see `scaling`), its other metadata files
as published (`metadata_files`), a tokenizer whose special tokens sit at their real ids, and
random weights in the published layout: the hub's key names (4.x legacy names for the HF formats),
dtype, file format and number of shards. Twins hold the same weights: an original-format
repository is its HF twin's weights under the original names, and both LLaVA-1.5 sizes share the
CLIP tower of openai/clip-vit-large-patch14-336, as the real checkpoints do.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from hooked_vlm.testing.common import _save_sharded, legacy_key, randomize_weights_
from hooked_vlm.testing.internvl import _original_internvl_tensors
from hooked_vlm.testing.llava import _original_llava_tensors
from hooked_vlm.testing.published import CLIP_REPO, PUBLISHED, full_size_config, metadata_files
from hooked_vlm.testing.published.internvl_facts import added_tokens as internvl_added_tokens
from hooked_vlm.testing.published.scaling import scale_config
from hooked_vlm.testing.tokenizers import _CORPUS, _train_bpe

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_published(root: str | Path, repo_ids: Iterable[str] | None = None, *, seed: int = 0) -> dict[str, Path]:
    """Write the repositories `repo_ids` (default: all of `PUBLISHED`), each to
    `root/<owner>__<name>`; an original LLaVA brings openai/clip-vit-large-patch14-336 along.
    Returns repository id -> directory."""
    root = Path(root)
    wanted = list(PUBLISHED) if repo_ids is None else list(repo_ids)
    rows = [PUBLISHED[r] for r in wanted]
    built: dict[str, Path] = {}
    llava_sizes = sorted({row.size for row in rows if row.fmt.startswith("llava")})
    clip = _write_clip(_directory(root, CLIP_REPO), seed) if llava_sizes else None
    if any(row.fmt == "llava-original" for row in rows):
        built[CLIP_REPO] = _directory(root, CLIP_REPO)
    for i, size in enumerate(llava_sizes + sorted({row.size for row in rows if row.fmt.startswith("internvl")})):
        family = "llava" if size in llava_sizes else "internvl"
        pair = [row for row in PUBLISHED.values() if row.size == size and row.fmt.startswith(family)]
        hf = next(row for row in pair if row.fmt.endswith("-hf"))
        state = _hf_weights(hf.repo_id, _directory(root, hf.repo_id), seed + 1 + i, clip if family == "llava" else None)
        for row in pair:
            if row.repo_id in wanted:
                _write_repository(row, _directory(root, row.repo_id), state)
                built[row.repo_id] = _directory(root, row.repo_id)
    return {repo_id: built[repo_id] for repo_id in wanted + [CLIP_REPO] if repo_id in built}


def _directory(root: Path, repo_id: str) -> Path:
    return root / repo_id.replace("/", "__")


def _write_metadata(directory: Path, repo_id: str, fmt: str, full_size: bool = False) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    config = full_size_config(repo_id) if full_size else scale_config(full_size_config(repo_id), fmt)
    files: dict[str, dict | str] = {"config.json": config} | metadata_files(repo_id)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (directory / name).write_text(text)
    return config


def write_metadata_and_tokenizer(directory: str | Path, repo_id: str) -> Path:
    """A repository without weights: its full-size config.json, every other metadata file and its
    tokenizer (what a meta-device build of the real model needs)."""
    directory = Path(directory)
    fmt = "clip" if repo_id == CLIP_REPO else PUBLISHED[repo_id].fmt
    _write_metadata(directory, repo_id, fmt, full_size=True)
    if fmt != "clip":  # openai's CLIP repository is used for its vision tower only
        _write_tokenizer(directory, fmt)
    return directory


def _write_tokenizer(directory: Path, fmt: str) -> None:
    if fmt == "llava-hf":
        _write_llava_hf_tokenizer(directory)
    elif fmt == "llava-original":
        (directory / "tokenizer.model").write_bytes(llama_sentencepiece_model())  # original LLaVA has no tokenizer.json
    else:
        for name, text in _qwen_files().items():
            (directory / name).write_text(text)


# ----------------------------------------------------------------------------------- weights
def _hf_weights(repo_id: str, directory: Path, seed: int, clip: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Random weights of the HF-format repository under transformers' runtime names, in the
    published dtype; a LLaVA tower is the CLIP repository's vision model."""
    from transformers import AutoConfig, InternVLForConditionalGeneration, LlavaForConditionalGeneration

    row = PUBLISHED[repo_id]
    config_dict = _write_metadata(directory, repo_id, row.fmt)
    config = AutoConfig.from_pretrained(directory)
    model_class = LlavaForConditionalGeneration if row.fmt == "llava-hf" else InternVLForConditionalGeneration
    model = randomize_weights_(model_class(config), seed=seed)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if clip is not None:
        tower = {name: state[name] for name in state if name.startswith("model.vision_tower.")}
        state |= {name: clip["vision_model." + name.removeprefix("model.vision_tower.")] for name in tower}
    dtype = DTYPES[config_dict["torch_dtype"]]
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def _write_repository(row, directory: Path, state: dict[str, torch.Tensor]) -> None:
    _write_metadata(directory, row.repo_id, row.fmt)
    _write_tokenizer(directory, row.fmt)
    if row.fmt == "llava-hf":
        tensors = {legacy_key(name, clip_tower=True): t for name, t in state.items()}
    elif row.fmt == "llava-original":
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(directory.with_name(row.twin.replace("/", "__")))
        tensors = _original_llava_tensors(state, hf_config)
        projector = {name: t.clone() for name, t in tensors.items() if name.startswith("model.mm_projector.")}
        torch.save(projector, directory / "mm_projector.bin")
    elif row.fmt == "internvl-hf":
        tensors = {legacy_key(name, clip_tower=False): t for name, t in state.items()}
    else:
        tensors = _original_internvl_tensors(state)
    _write_weights(directory, tensors, row.shards, row.weights, with_parameter_count=row.fmt == "internvl-hf")


def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], shards: int, fmt: str, with_parameter_count: bool) -> None:
    """One file without an index, or `shards` files named and indexed as transformers names them."""
    tensors = {name: t.contiguous().clone() for name, t in tensors.items()}
    if shards == 1 and fmt == "safetensors":
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    per = -(-len(names) // shards)
    _save_sharded(tensors, [names[i * per : (i + 1) * per] for i in range(shards)], directory, fmt)
    if with_parameter_count:  # transformers >= 4.55 records it next to total_size
        index_file = directory / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        index["metadata"]["total_parameters"] = sum(t.numel() for t in tensors.values())
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def _write_clip(directory: Path, seed: int) -> dict[str, torch.Tensor]:
    """openai/clip-vit-large-patch14-336: a whole CLIPModel (text tower, projections and the
    position-id buffers that 4.2x saved) in one fp32 pytorch_model.bin; returns its weights."""
    from transformers import AutoConfig, CLIPModel

    _write_metadata(directory, CLIP_REPO, "clip")
    model = randomize_weights_(CLIPModel(AutoConfig.from_pretrained(directory)), seed=seed)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for tower in ("text_model", "vision_model"):
        table = state[f"{tower}.embeddings.position_embedding.weight"]
        state[f"{tower}.embeddings.position_ids"] = torch.arange(table.shape[0])[None]
    torch.save(state, directory / "pytorch_model.bin")
    return state


# ----------------------------------------------------------------------------------- tokenizers
@lru_cache(maxsize=1)
def llama_sentencepiece_model() -> bytes:
    """A small Llama-style sentencepiece model (`<unk>` 0, `<s>` 1, `</s>` 2, byte fallback),
    trained on the built-in corpus: the `tokenizer.model` original LLaVA ships (it has no tokenizer.json)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, vocab_size=500, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    return model.getvalue()


def _write_llava_hf_tokenizer(directory: Path) -> None:
    """llava-hf's tokenizer.json as transformers 4.36 wrote it (the legacy Llama normaliser, BOS
    from the post-processor) with `<image>` 32000 and `<pad>` 32001, and the tokenizer.model it
    was converted from."""
    from transformers import LlamaTokenizer

    (directory / "tokenizer.model").write_bytes(llama_sentencepiece_model())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(llama_sentencepiece_model())
        LlamaTokenizer.from_pretrained(tmp, legacy=False).save_pretrained(Path(tmp) / "out")
        tokenizer = json.loads((Path(tmp) / "out" / "tokenizer.json").read_text())
    added = {"<image>": 32000, "<pad>": 32001}
    tokenizer["model"]["vocab"] |= added  # tokenizers keeps an added token's id only if the model has it
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    tokenizer["added_tokens"] += [{"id": i, "content": token, **flags} for token, i in added.items()]
    space = {"String": " "}
    tokenizer["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                               {"type": "Replace", "pattern": space, "content": "▁"}]}  # fmt: skip
    tokenizer["pre_tokenizer"] = None
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False))


@lru_cache(maxsize=1)
def _qwen_files() -> dict[str, str]:
    """tokenizer.json, vocab.json and merges.txt of a small Qwen-style byte-level BPE whose added
    tokens are Qwen3's and InternVL's at their real ids (151643 ...)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")
    byte_level = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _train_bpe(byte_level, 600, pre_tokenizers.ByteLevel.alphabet())
    added = internvl_added_tokens()
    tokenizer = Qwen2Tokenizer(vocab=vocab | added, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_text() for name in ("tokenizer.json", "vocab.json", "merges.txt") if (Path(tmp) / name).exists()}
