"""What each toy model is: its synthetic data, architecture, and training recipe.

A `ToySpec` fixes everything but the seed; `python -m hooked_vlm.toy_models.train --family F
--seed S` trains one, and later stages continue it (`--init-from`, with their own steps, peak
learning rate, task weights or image sizes). The architectures follow `hooked_vlm.testing`'s
tiny configs (llava-1.5 and InternVL-3.5 structure at small sizes); only the sizes are chosen here.

Sizes, and why:
- Both: 4-px patches. With 8-px patches a patch mixes object and background in too many ways and
  the LLaVA tower learned colours but not shapes in 8000 steps.
- LLaVA: a 32-px tower (8x8 = 64 image tokens), images of 32x32, 32x24 and 24x32, so pad mode
  (pad to square with the mean colour) never resamples them.
- InternVL: 32-px tiles (8x8 patches -> 4x4 = 16 tokens per view after pixel shuffle). The
  shipped model sees 64x32 images (two tiles + the thumbnail: 48 image tokens) and 32x32 ones (a
  single tile). Mixing 64x32 with 32x64, 64x64 and 96x32 (its first stage) left multi-tile
  localization at 0.2-0.6: with 16 tokens per view the language model cannot tell a 2x1 grid from
  a 1x2 one (the same 48 tokens) nor count tiles reliably, so the final stage keeps one tiled
  layout that the token count identifies.

Two shapes whose silhouettes differ at a glance and six colours (12 classes); a distractor may
share the target's colour or shape, so naming or finding "the red circle" needs both. A
distractor that finds no free spot is dropped, and in these small images that is common: 86% of
toy-llava's images (32 px) and 51% of toy-internvl's hold the target alone (300 "test" items).

The shipped checkpoints, seed 0, one torch thread (each `training.json` records every stage):

    T="python -m hooked_vlm.toy_models.train --seed 0 --threads 1"
    $T --family llava --out l1                                   # 14000 steps, lr 1e-3
    $T --family llava --init-from l1 --steps 4000 --lr 5e-4 --out l2
    $T --family llava --init-from l2 --steps 6000 --lr 5e-4 --task-weights 0.35,0.4,0.25 --out l3
    $T --family llava --init-from l3 --steps 5000 --lr 3e-4 --task-weights 0.3,0.4,0.3 --out l4
    $T --family llava --init-from l4 --steps 3000 --lr 3e-4 --task-weights 0.3,0.4,0.3 --head-dropout 0.1 --out l5
    $T --family llava --init-from l5 --steps 4000 --lr 2e-4 --task-weights 0.3,0.35,0.35 --head-dropout 0.1 --out l6
    $T --family llava --init-from l6 --steps 4000 --lr 3e-4 --task-weights 0.3,0.35,0.35 --head-dropout 0.1 \
       --crowded-share 0.5 --out l7
    $T --family llava --init-from l7 --steps 7000 --lr 5e-4 --task-weights 0.3,0.3,0.4 --head-dropout 0.1 \
       --crowded-share 0.5 --shape-negatives 0.5 --shape-probe 2.0 --out toy-llava
    $T --family internvl --image-sizes 64x32,32x64,64x64,96x32,32x32 --out i1    # 12000 steps, lr 1e-3
    $T --family internvl --init-from i1 --steps 5000 --lr 5e-4 --out i2
    $T --family internvl --init-from i2 --steps 3000 --lr 3e-4 --task-weights 0.4,0.4,0.2 --out i3
    $T --family internvl --init-from i3 --steps 3000 --lr 2e-4 --task-weights 0.4,0.3,0.3 --out i4
    $T --family internvl --init-from i4 --steps 7000 --lr 5e-4 --task-weights 0.3,0.3,0.4 \
       --crowded-share 0.5 --shape-negatives 0.5 --shape-probe 2.0 --out i5
    $T --family internvl --init-from i5 --steps 4000 --lr 3e-4 --task-weights 0.3,0.3,0.4 --head-dropout 0.1 \
       --crowded-share 0.5 --shape-negatives 0.5 --shape-probe 2.0 --out toy-internvl

About 0.17-0.2 s (LLaVA) and 0.2-0.26 s (InternVL) per step on one core: 2.7 and 2.2 hours in all.

toy-llava's last four stages zero each language-model head with probability 0.1 per example
(`--head-dropout`). Without it (stage l4) the 16-head model leaned on first-layer heads that
carry no object-specific signal (mediation fraction ~0) yet break localization alone (zeroing
head 0.1 or 0.2: score 0.00 and 0.03 of 0.93), so the paper's low-importance control ablated
more than the top-MF heads did; large models are redundant, and head dropout makes the toy so.
In the shipped toy, zeroing the top 2 heads by MF gives 0.72, the 2 least-|MF| heads 0.81
(baseline 0.91; `tests/test_mechanisms.py`'s items). At 4 heads the order flips (0.59 against
0.51): beyond the top eighth, the least-|MF| heads include ones the box needs.

toy-llava's listing errors were shape confusions (a circle named a square) on the few images
that hold a distractor: l5 named the target on 8 of 17 such test images and on 132 of 133
others. l7 draws half of each batch from images with a distractor (`--crowded-share 0.5`);
held-out list accuracy went from 0.96 / 0.933 (val / test, l5) to 0.96 / 0.953.

Its yes/no stayed at 0.93 through l7, every error a Yes to the target's colour in the other
shape ("is there a green circle?" beside a green square): the one negative colour alone cannot
answer, scored apart by the evaluation (`binary_shape_negative_accuracy`; l7 said No to it on 1
of 148 val items). l7's image features carried shape weakly (a linear probe for circle vs square
on the mean projector output over the target's tokens: 0.72 on held-out images), and stages
that only asked the question more often (`--shape-negatives 0.5`: 4000 steps at lr 3e-4, 5000
at 5e-4, vision tower at 5x and 10x the learning rate, and an 8000-step run from scratch) all
ended at 0-5% with a flat binary loss (0.25-0.27). The last stage adds an auxiliary loss
(`--shape-probe`, `train.ShapeProbe`): a linear head, discarded afterwards, reads each image
token's projector output and names the shape of the object covering it (or background). The
features learn shape within 1000 steps (probe loss 0.04); the binary loss then sits at its
colour-only level (0.25-0.30) for thousands of steps before it falls, as the answer is an XOR of
the asked shape and the seen one. Where it falls moves with the run: with probe weight 1.0 at lr
3e-4 it had not in 4000 steps (shape negatives 0.03 on val); at weight 2.0, lr 5e-4, binary
weight 0.4, three 5000-step runs differing only in the head's initialisation ended at 0.95,
0.45 (two heads drawn before the head was seeded: neither repeats) and 0.73 (seeded; list
accuracy 0.947 on test). The shipped stage runs 7000 steps: binary loss 0.24 at step 3000, 0.08
at 6000; held-out (val / test) shape negatives 0.97 / 0.96, yes/no 0.987 / 0.993, list 0.993 /
0.980, loc@0.5 0.960 / 0.947 (l7: 0.947 / 0.947). Its command, rerun from l7 on the same
machine, gave bit-identical weights.

toy-internvl's stage i4 (8-px tokens after pixel shuffle) said No to that question on 0.76 / 0.69
(val / test). Stage i5 is toy-llava's last recipe without head dropout (the probe labels every
tile's and the thumbnail's tokens): the binary loss fell from 0.15 to 0.01 by step 2500, and held
out (val / test) shape negatives went to 1.00 / 1.00, yes/no from 0.962 / 0.980 to 1.00 / 1.00,
list from 0.967 / 0.980 to 0.980 / 0.987, loc@0.5 from 0.867 / 0.853 to 0.880 / 0.867. But its
localization rested on two heads, (0, 1) and (2, 1): ablating them took the score from 0.83 to
0.00 (i4: 0.77 to 0.02), so the paper's cumulative head ablation fell off a cliff at the first
step. The shipped last stage adds head dropout, as toy-llava's: the top two heads now take it to
0.59, the top four to 0.41 (the least-|MF| two and four: 0.75, 0.52); held out, loc@0.5 0.873 /
0.873, list 0.987 / 1.000, yes/no and shape negatives 1.00 / 1.00. Localization by layout (test):
a 32x32 single-tile image 1.00 (i4: 1.00), a 64x32 target straddling both tiles 0.88 (0.88), one
inside a single tile 0.65 (0.59). Both stages, each run twice side by side, gave bit-identical
weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.testing import internvl_processor, llava_processor, tiny_internvl_config, tiny_llava_config

Family = Literal["llava", "internvl"]


SHAPES = ("circle", "square")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")


@dataclass(frozen=True)
class DataSpec:
    """The `SyntheticLocalization` distribution a toy is trained and evaluated on."""

    image_sizes: tuple[tuple[int, int], ...]
    object_size: tuple[float, float]
    n_distractors: tuple[int, int] = (1, 2)
    n_list_choices: int | None = 6  # present classes + random absent ones (keeps prompts short)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS

    def dataset(self, n: int, seed: int, split: str) -> SyntheticLocalization:
        return SyntheticLocalization(
            n, seed, split=split, image_sizes=self.image_sizes, object_size=self.object_size,
            n_distractors=self.n_distractors, n_list_choices=self.n_list_choices,
            shapes=self.shapes, colours=self.colours,
        )  # fmt: skip


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`.

    `task_weights`: the probability that an item contributes its localization, list or binary
    example (one example per item; binary: Yes half the time, else one of the two kinds of No)."""

    steps: int = 6000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    task_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    head_dropout: float = 0.0  # probability of zeroing a language-model head per example (see train.py)
    crowded_share: float = 0.0  # share of each batch drawn from items with a distractor (see train.py)
    shape_negatives: float = 0.0  # probability a binary No asks for the target's colour in another shape (data.py)
    shape_probe: float = 0.0  # weight of an auxiliary shape loss on the image features (train.ShapeProbe)
    tokenizer_items: int = 2000  # items whose prompts and answers train the BPE
    eval_items: int = 150  # held-out items scored at the end (split "val")


@dataclass(frozen=True)
class ToySpec:
    family: Family
    name: str  # the shipped directory under hooked_vlm/toy_models/
    data: DataSpec
    model: dict[str, Any]  # keyword arguments of the testing.tiny_*_config builder
    train: TrainSpec = field(default_factory=TrainSpec)
    max_tiles: int = 4  # InternVL only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TOY_SPECS: dict[str, ToySpec] = {
    "llava": ToySpec(
        family="llava",
        name="toy-llava",
        data=DataSpec(image_sizes=((32, 32), (32, 24), (24, 32)), object_size=(10, 18)),
        model={
            "d_model": 128, "d_mlp": 256, "n_layers": 4, "n_heads": 4,
            "vision_d_model": 96, "vision_d_mlp": 256, "vision_layers": 5, "vision_heads": 4,
            "image_size": 32, "patch_size": 4, "vision_feature_layer": -2,
        },  # fmt: skip
        train=TrainSpec(steps=14000, lr=1e-3),
    ),
    "internvl": ToySpec(
        family="internvl",
        name="toy-internvl",
        data=DataSpec(image_sizes=((64, 32), (32, 32)), object_size=(12, 22)),
        model={
            "vision_variant": "300m", "d_model": 128, "d_mlp": 256, "n_layers": 4, "n_heads": 4,
            "n_key_value_heads": 2, "d_head": 32, "tie_word_embeddings": False,
            "vision_d_model": 96, "vision_d_mlp": 256, "vision_layers": 4, "vision_heads": 4,
            "image_size": 32, "patch_size": 4,
        },  # fmt: skip
        train=TrainSpec(steps=12000, lr=1e-3),
        max_tiles=4,
    ),
}


# ------------------------------------------------------------------------------ HF objects
def build_model(spec: ToySpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A freshly initialised HF model (transformers' own init, seeded) with sdpa attention."""
    torch.manual_seed(seed)
    if spec.family == "llava":
        base_vocab = tokenizer.convert_tokens_to_ids("<image>")
        config = tiny_llava_config(vocab_size=base_vocab, **spec.model)
        return LlavaForConditionalGeneration(config)
    config = tiny_internvl_config(tokenizer, **spec.model)
    return InternVLForConditionalGeneration(config)


def build_processor(spec: ToySpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> ProcessorMixin:
    """The HF processor saved with the checkpoint. LLaVA: a `LlavaImageProcessor` with
    `do_pad=True` (pad to square with the mean colour, then resize; what makes the library use
    its "pad" image mode). InternVL: GotOcr2 tiling with `max_tiles` tiles plus the thumbnail."""
    if spec.family == "internvl":
        return internvl_processor(tokenizer, model.config, 1, spec.max_tiles)
    return llava_processor(tokenizer, model.config, pad=True)


def save_checkpoint(out: Path, model: PreTrainedModel, processor: ProcessorMixin, family: Family) -> None:
    """`save_pretrained` of model (fp32 safetensors) and processor, plus a standalone
    preprocessor_config.json as hub repos have (5.x nests it in processor_config.json only)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    processor.tokenizer.padding_side = "left"  # batched generation, as the library pads
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    fields = {"add_bos_token": True, "add_eos_token": False} if family == "llava" else {"processor_class": "InternVLProcessor"}
    _update_json(out / "tokenizer_config.json", fields)
    if family == "internvl":  # the saved class is testing's video-less subclass; name the real one
        _update_json(out / "processor_config.json", {"processor_class": "InternVLProcessor"})


def _update_json(file: Path, fields: dict[str, Any]) -> None:
    data = json.loads(file.read_text()) | fields
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
