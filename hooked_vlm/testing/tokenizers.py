"""Small BPE tokenizers trained offline, and the two families' chat templates."""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    LlamaTokenizer,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# --------------------------------------------------------------------------------- tokenizers

_CORPUS = """\
USER: What is in the image? ASSISTANT: A cat is sitting on a red chair next to the window.
Describe the picture in detail. There are two dogs playing with a ball in the park.
Where is the person? Answer with a bounding box [0.12, 0.34, 0.56, 0.78].
Please give the coordinates of the cup: <ref>cup</ref><box>[[120, 340, 560, 780]]</box>
How many birds are there? There are 3 birds on the wire and 12 more in the sky.
The astronaut stands in front of the flag. The rocket launches at 10:45 am!
A woman with glasses is wearing a dark uniform; she smiles at the camera.
Is the coffee hot or cold? The coffee is hot, with foam on top of the cup.
Locate the object in the image and output its box (x1, y1, x2, y2).
What color is the car? The car is blue, the bus is yellow and the truck is white.
The man on the left holds an umbrella, the girl on the right holds a kite.
Count the apples: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 42, 100, 256, 1000 and 3.14 appear.
Is there a dog in this photo? Yes, there is a small brown dog under the table.
Question: which animal is bigger? Answer: the elephant is bigger than the horse.
The kitchen has a white oven, a sink, a fridge and a wooden table with chairs.
A plate of food: rice, chicken, broccoli and a slice of lemon on the side.
The sign says "STOP". The street is wet after the rain, and the lights are on.
Two people are riding bicycles along the river; trees line the path.
The train arrives at the station at night. Passengers wait on the platform.
She is reading a book about science, history and mathematics in the library.
Provide a short caption: a black and white photo of an old building.
The image shows a laptop, a phone, a keyboard and a mouse on the desk.
Answer the question using a single word or phrase. Left or right? Right.
What is the boy doing? He is throwing a frisbee to his friend on the beach.
The clock on the wall reads 7:30. A vase with flowers sits on the shelf.
Let's think step by step: first find the cat, then find the chair, then compare.
{"label": "person", "bbox": [10, 20, 30, 40]} - done. (Note: boxes are 0-1000.)
Output format: <box>[[x1, y1, x2, y2]]</box> where all values are integers.
Sky, grass, water, sand, snow, road, wall, floor, door, roof, tree, cloud, sun, moon.
"""

LLAVA_CHAT_TEMPLATE = (
    # llava-hf/llava-1.5-*-hf chat_template, verbatim.
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

INTERNVL_CHAT_TEMPLATE = (
    # The InternVL-HF conversion script's template (481 bytes, like InternVL3-8B-hf's file).
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is "
    "string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif "
    "content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3's own specials, then what InternVL adds, in id order (as real: 151643 <|endoftext|>, ...).
INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
)  # fmt: skip
_INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def _train_bpe(pre_tokenizer, vocab_size: int, initial_alphabet: list[str]) -> tuple[dict[str, int], list]:
    """Train a BPE model on the built-in corpus; returns (vocab, merges) in training order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=initial_alphabet, show_progress=False)
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_llama_tokenizer(vocab_size: int = 500) -> LlamaTokenizer:
    """A Llama-2 style tokenizer: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte-fallback tokens, then
    BPE pieces with the `▁` word marker. BOS is added automatically; any text encodes (unknown
    characters fall back to bytes). This is the *base* vocabulary, as in vicuna / original LLaVA."""
    n_learned = vocab_size - 3 - 256
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learned, merges = _train_bpe(metaspace, n_learned, initial_alphabet=[])
    if len(learned) != n_learned:
        raise ValueError(f"the built-in corpus yields at most {len(learned) + 259} tokens, not {vocab_size}")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    vocab |= {piece: 259 + i for i, piece in enumerate(learned)}
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)


def build_llava_tokenizer(vocab_size: int = 500) -> LlamaTokenizer:
    """`build_llama_tokenizer` plus what the llava-hf conversion appended: `<image>` (id
    `vocab_size`) and `<pad>` (id `vocab_size + 1`), and the llava-hf chat template."""
    return with_llava_hf_tokens(build_llama_tokenizer(vocab_size))


def with_llava_hf_tokens(tokenizer: LlamaTokenizer) -> LlamaTokenizer:
    """What the llava-hf conversion appended to a Llama tokenizer: `<image>` (the base vocabulary
    size's id), `<pad>` after it, and the llava-hf chat template. In place; returns `tokenizer`."""
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_internvl_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """A Qwen3 / InternVL-3.5 style byte-level BPE tokenizer (no BOS added) with the
    `INTERNVL_SPECIAL_TOKENS` at ids `vocab_size, vocab_size + 1, ...`, the named
    `start_image_token`/`end_image_token`/`context_image_token`/`video_token` attributes that
    InternVLProcessor reads, and the InternVL-HF chat template."""
    byte_level = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = _train_bpe(byte_level, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    if len(vocab) != vocab_size:
        raise ValueError(f"the built-in corpus yields at most {len(vocab)} tokens, not {vocab_size}")
    return internvl_tokenizer(vocab, merges)


def internvl_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer over a byte-level BPE `vocab` and `merges`, with InternVL's
    `INTERNVL_SPECIAL_TOKENS` at the ids after the vocabulary, the named image tokens
    InternVLProcessor reads, no BOS, EOS `<|im_end|>` and the InternVL-HF chat template."""
    # Specials placed in the vocab fix their ids; registering them as added tokens below reuses those ids.
    base = len(vocab)
    vocab = vocab | {token: base + i for i, token in enumerate(INTERNVL_SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(_INTERNVL_NAMED_TOKENS),
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_SPECIAL_TOKENS])
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer
