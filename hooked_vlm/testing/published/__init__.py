"""The published checkpoints `HookedVLM.from_pretrained` supports, as facts, and test fixtures built from them.

One row per hub repository: its format, its twin (the same weights in the other format), how its
weights are stored, what its weight index says (key count, a fingerprint of the sorted key names,
total bytes) where the index was found, and which of its files were found and which assumed. The
files' contents are in `llava_facts` and `internvl_facts`; `build_published` writes scaled-down
copies of the repositories (random weights, real metadata; see `scaling`), and
`hooked_vlm.testing.hub_cache` lays them out as the Hugging Face cache does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hooked_vlm.testing.published import internvl_facts, llava_facts


@dataclass(frozen=True)
class IndexFacts:
    """What a repository's published weight index says."""

    n_keys: int
    key_fingerprint: str  # `key_fingerprint(keys)` of its key names
    total_size: int  # bytes, the index's metadata
    total_parameters: int | None = None


@dataclass(frozen=True)
class PublishedRepo:
    repo_id: str
    fmt: str  # "llava-hf", "llava-original", "internvl-hf", "internvl-original"
    size: str  # "7b", "13b" (LLaVA); "1B" ... "38B" (InternVL)
    twin: str  # the repository holding the same weights in the other format
    weights: str  # "safetensors" or "bin"
    shards: int  # weight files; 1 = a single file without an index
    found: str  # which files are copies of the hub's (where from: the README)
    index: IndexFacts | None = None  # None: the index was not found; keys and shapes derived from the config
    parameters: int | None = None  # the published parameter count, where one was found

    @property
    def assumed(self) -> str:
        return "everything else" if self.found else "every file"


def key_fingerprint(keys) -> str:
    """16 hex digits identifying a set of tensor names (sha256 of the sorted names, one per line)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


_LLAVA_HF_7B = IndexFacts(686, "d87fc2ecd8ca2391", 14126854144)
_LLAVA_ORIGINAL_7B = IndexFacts(327, "d2d2aca9a1e1bdc1", 13518798848)
_INTERNVL_8B = IndexFacts(745, "019a53a9bfbcb22e", 17056636928)
_INTERNVL_8B_HF = IndexFacts(841, "56e5711a44438287", 17056636928, total_parameters=8528318464)
# Shards: 5 GB each for transformers >= 4.3x saves (llava-hf, InternVL), 10 GB for LLaVA's 4.31
# .bin shards; counts not seen in an index are the total size divided by that.
_INTERNVL_SHARDS = {"1B": 1, "2B": 1, "4B": 2, "8B": 4, "14B": 7, "38B": 16}
# Parameter counts: 8B-HF's index metadata; 1B-HF's as a third-party record of the checkpoint
# states it (304,012,288 vision + 5,253,120 projector + 751,632,384 language, its own LM head)
_INTERNVL_PARAMETERS = {"1B": 1060897792, "8B": 8528318464}


def _rows() -> list[PublishedRepo]:
    rows = [
        PublishedRepo("llava-hf/llava-1.5-7b-hf", "llava-hf", "7b", "liuhaotian/llava-v1.5-7b", "safetensors", 3,
                      "every metadata file and the weight index", _LLAVA_HF_7B),
        PublishedRepo("llava-hf/llava-1.5-13b-hf", "llava-hf", "13b", "liuhaotian/llava-v1.5-13b", "safetensors", 6,
                      "config.json's text sizes (ARCHITECTURES §1.3)"),
        PublishedRepo("liuhaotian/llava-v1.5-7b", "llava-original", "7b", "llava-hf/llava-1.5-7b-hf", "bin", 2,
                      "config, generation and tokenizer configs, special tokens, weight index", _LLAVA_ORIGINAL_7B),
        PublishedRepo("liuhaotian/llava-v1.5-13b", "llava-original", "13b", "llava-hf/llava-1.5-13b-hf", "bin", 3,
                      "config.json (two transcriptions)"),
    ]  # fmt: skip
    for size in internvl_facts.SIZES:
        original, hf = f"OpenGVLab/InternVL3_5-{size}", f"OpenGVLab/InternVL3_5-{size}-HF"
        is_8b = size == "8B"
        parameters = _INTERNVL_PARAMETERS.get(size)
        rows.append(PublishedRepo(original, "internvl-original", size, hf, "safetensors", _INTERNVL_SHARDS[size],
                                  "config.json, chat_template.jinja, weight index keys" if is_8b else "",
                                  _INTERNVL_8B if is_8b else None, parameters))  # fmt: skip
        rows.append(PublishedRepo(hf, "internvl-hf", size, original, "safetensors", _INTERNVL_SHARDS[size],
                                  "config.json, generation_config.json, weight index keys" if is_8b else "",
                                  _INTERNVL_8B_HF if is_8b else None, parameters))  # fmt: skip
    return rows


PUBLISHED: dict[str, PublishedRepo] = {row.repo_id: row for row in _rows()}
CLIP_REPO = llava_facts.CLIP_REPO  # original LLaVA's vision tower, a repository of its own (pytorch_model.bin)


def published_repo(repo_id: str) -> PublishedRepo:
    if repo_id not in PUBLISHED:
        raise KeyError(f"{repo_id!r} is not a published checkpoint hooked_vlm knows; known: {', '.join(PUBLISHED)}")
    return PUBLISHED[repo_id]


def full_size_config(repo_id: str) -> dict:
    """The repository's config.json as published (openai/clip-vit-large-patch14-336 included)."""
    if repo_id == CLIP_REPO:
        return llava_facts.clip_config()
    row = published_repo(repo_id)
    return {
        "llava-hf": llava_facts.llava_hf_config,
        "llava-original": llava_facts.llava_original_config,
        "internvl-hf": internvl_facts.internvl_hf_config,
        "internvl-original": internvl_facts.internvl_original_config,
    }[row.fmt](row.size)


def metadata_files(repo_id: str) -> dict[str, dict | str]:
    """Every small file of the repository but config.json and the weight index: file name -> JSON
    content (a dict) or text. Tokenizer vocabularies are not facts: the fixture trains its own."""
    if repo_id == CLIP_REPO:
        return {"preprocessor_config.json": llava_facts.CLIP_PREPROCESSOR_CONFIG}
    fmt = published_repo(repo_id).fmt
    if fmt == "llava-hf":
        return {
            "generation_config.json": llava_facts.LLAVA_HF_GENERATION_CONFIG,
            "preprocessor_config.json": llava_facts.LLAVA_HF_PREPROCESSOR_CONFIG,
            "processor_config.json": llava_facts.LLAVA_HF_PROCESSOR_CONFIG,
            "tokenizer_config.json": llava_facts.LLAVA_HF_TOKENIZER_CONFIG,
            "special_tokens_map.json": llava_facts.LLAVA_HF_SPECIAL_TOKENS_MAP,
            "added_tokens.json": llava_facts.LLAVA_HF_ADDED_TOKENS,
            "chat_template.json": {"chat_template": llava_facts.LLAVA_HF_TEMPLATE},
            "chat_template.jinja": llava_facts.LLAVA_HF_TEMPLATE,
        }
    if fmt == "llava-original":
        return {
            "generation_config.json": llava_facts.LLAVA_ORIGINAL_GENERATION_CONFIG,
            "tokenizer_config.json": llava_facts.LLAVA_ORIGINAL_TOKENIZER_CONFIG,
            "special_tokens_map.json": llava_facts.LLAVA_ORIGINAL_SPECIAL_TOKENS_MAP,
        }
    hf = fmt == "internvl-hf"
    files: dict[str, dict | str] = {
        "tokenizer_config.json": internvl_facts.tokenizer_config(hf),
        "special_tokens_map.json": internvl_facts.SPECIAL_TOKENS_MAP,
        "added_tokens.json": internvl_facts.added_tokens(),
        "chat_template.jinja": internvl_facts.HF_TEMPLATE if hf else internvl_facts.ORIGINAL_TEMPLATE,
    }
    if hf:
        files |= {
            "generation_config.json": internvl_facts.HF_GENERATION_CONFIG,
            "preprocessor_config.json": internvl_facts.HF_PREPROCESSOR_CONFIG,
            "processor_config.json": internvl_facts.HF_PROCESSOR_CONFIG,
        }
    else:
        files["preprocessor_config.json"] = internvl_facts.ORIGINAL_PREPROCESSOR_CONFIG
    return files


from hooked_vlm.testing.published.build import build_published, write_metadata_and_tokenizer  # noqa: E402  (build imports the table)

__all__ = [
    "PUBLISHED", "CLIP_REPO", "IndexFacts", "PublishedRepo", "published_repo", "full_size_config", "metadata_files",
    "key_fingerprint", "build_published", "write_metadata_and_tokenizer",
]  # fmt: skip
