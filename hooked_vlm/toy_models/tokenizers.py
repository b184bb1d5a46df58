"""Small tokenizers for the toy models, trained on the synthetic dataset's own text.

Each toy gets a tokenizer of its family's kind, like `hooked_vlm.testing` builds them, but the
BPE merges are learned from `hooked_vlm.data.synthetic.text_corpus` (plus the chat templates'
words), so every prompt word is one or two tokens and prompts stay short:

- LLaVA: a Llama-2 style tokenizer (`<unk>`, `<s>`, `</s>`, 256 byte-fallback tokens, `▁`-marked
  BPE pieces) plus llava-hf's appended `<image>` and `<pad>`.
- InternVL: a Qwen3 style byte-level BPE plus InternVL's special tokens (`<img>`, `<IMG_CONTEXT>`,
  `<ref>`, `<box>`, ...).

Digits are always single tokens, as in Llama and Qwen: Qwen's pre-tokenizer isolates them by
itself; for Llama, training isolates them, so no learned merge contains a digit and the runtime
tokenizer (which has no digit rule) splits numbers digit by digit all the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from hooked_vlm.testing.tokenizers import INTERNVL_SPECIAL_TOKENS, internvl_tokenizer, with_llava_hf_tokens

# Upper bound on learned pieces: the trainer stops earlier, once every word is a single piece.
MAX_LEARNED_PIECES = 2000
_LLAVA_TEMPLATE_TEXT = "USER: \nPlease ASSISTANT: [0.5]"
_INTERNVL_TEMPLATE_TEXT = "user\nPlease\nassistant\n"


def _train_bpe(texts: Iterable[str], pre_tokenizer, initial_alphabet: list[str]) -> tuple[dict[str, int], list]:
    """BPE on `texts`: (vocab, merges) in training order. Deterministic for a given text order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_LEARNED_PIECES, initial_alphabet=initial_alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def _without_specials(texts: Iterable[str]) -> list[str]:
    """Cut the texts at InternVL's special tokens: they are added tokens, never BPE pieces."""
    pattern = re.compile("|".join(re.escape(t) for t in INTERNVL_SPECIAL_TOKENS))
    return [chunk for text in texts for chunk in pattern.split(text) if chunk]


def build_llava_tokenizer(corpus: Iterable[str]) -> LlamaTokenizer:
    """A llava-hf style tokenizer whose BPE pieces are learned from `corpus`.

    Ids: `<unk>`=0, `<s>`=1, `</s>`=2, bytes 3..258, learned pieces, then `<image>` (the base
    vocabulary size, as llava-hf) and `<pad>`. BOS is added; the chat template is llava-hf's."""
    training_split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    learned, merges = _train_bpe([*corpus, _LLAVA_TEMPLATE_TEXT], training_split, initial_alphabet=[])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    vocab |= {piece: len(vocab) + i for i, piece in enumerate(p for p in learned if p not in vocab)}
    return with_llava_hf_tokens(LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False))


def build_internvl_tokenizer(corpus: Iterable[str]) -> Qwen2Tokenizer:
    """An InternVL-3.5 style (Qwen3 byte-level BPE) tokenizer whose merges are learned from
    `corpus`; `INTERNVL_SPECIAL_TOKENS` follow the learned vocabulary. No BOS; EOS `<|im_end|>`."""
    byte_level = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    texts = _without_specials([*corpus, _INTERNVL_TEMPLATE_TEXT])
    vocab, merges = _train_bpe(texts, byte_level, pre_tokenizers.ByteLevel.alphabet())
    return internvl_tokenizer(vocab, merges)
