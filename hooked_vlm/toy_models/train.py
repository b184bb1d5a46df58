"""Train a toy model on the synthetic localization task and save it in Hugging Face format.

    python -m hooked_vlm.toy_models.train --family llava --seed 0 --out DIR
    python -m hooked_vlm.toy_models.train --family llava --seed 0 --init-from DIR --steps 4000 --lr 5e-4 --out DIR2

The first trains from scratch; the second continues DIR as a later stage with its own schedule.
The shipped toys took 8 (LLaVA) and 6 (InternVL) stages: `spec.py`'s docstring lists their exact
commands.

Writes to `--out`: `config.json` + `model.safetensors` (fp32), the tokenizer, processor and
preprocessor configs and chat template (loadable by transformers and by
`HookedVLM.from_pretrained(path)`), and `training.json` (spec, seed, steps, losses, held-out
metrics via HF `generate`, wall time, and the earlier stages' records). Copy the last stage's
directory to `hooked_vlm/toy_models/toy-{family}/` to ship it.

Recipe (see `spec.py`): a BPE tokenizer learned from the training split's text; transformers'
own initialisation; every step draws `batch_size` fresh items (item k of split "train" is used
once, at step k // batch_size) and one task per item; teacher-forced cross-entropy on answer
tokens only (the last stages of both toys add an auxiliary shape loss on the image features,
`ShapeProbe`); AdamW with linear warmup and cosine decay; held-out metrics on split "val".

Determinism: everything random is seeded (items by (seed, split, index), task choice by
(seed, step), weights by `torch.manual_seed(seed)`), and `torch.use_deterministic_algorithms`
is on. On CPU a run is bit-for-bit repeatable on the same machine, torch build and thread count;
a different thread count or CPU (other SIMD kernels) changes float summation order, so the
weights then differ in the last bits and drift apart over training, while the metrics stay close.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

from hooked_vlm.data.synthetic import SyntheticItem, text_corpus
from hooked_vlm.testing import load_hf_processor
from hooked_vlm.families import internvl as internvl_family
from hooked_vlm.families import llava as llava_family
from hooked_vlm.families.internvl import InternVLPreprocessing
from hooked_vlm.families.llava import LlavaPreprocessing
from hooked_vlm.toy_models.data import IGNORE_INDEX, TASKS, ToyEncoder, answer_loss, training_batch
from hooked_vlm.toy_models.evaluate import evaluate, evaluate_shipped, hf_generate, record_metrics
from hooked_vlm.toy_models.spec import TOY_SPECS, ToySpec, build_model, build_processor, save_checkpoint
from hooked_vlm.toy_models.tokenizers import build_internvl_tokenizer, build_llava_tokenizer

HF_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "internvl": InternVLForConditionalGeneration}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_tokenizer(spec: ToySpec, seed: int):
    items = spec.data.dataset(spec.train.tokenizer_items, seed, "train")
    corpus = text_corpus(items, families=[spec.family])
    return build_llava_tokenizer(corpus) if spec.family == "llava" else build_internvl_tokenizer(corpus)


def optimizer_for(model: torch.nn.Module, spec: ToySpec) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings tables of position."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "position" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": spec.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.train.lr, betas=(0.9, 0.98))


def initial_state(spec: ToySpec, seed: int, init_from: Path | None) -> tuple[Any, Any, list[dict]]:
    """(model, processor, earlier runs). From scratch: a tokenizer learned from the training
    split and transformers' seeded init. `init_from`: a checkpoint written by this script, whose
    training continues (a second stage with its own schedule; its runs are kept in the record)."""
    if init_from is None:
        tokenizer = build_tokenizer(spec, seed)
        model = build_model(spec, tokenizer, seed)
        return model, build_processor(spec, tokenizer, model), []
    earlier = json.loads((init_from / "training.json").read_text())
    if earlier["family"] != spec.family or earlier["seed"] != seed:
        raise ValueError(f"{init_from} is a {earlier['family']} run with seed {earlier['seed']}")
    model = HF_MODEL_CLASSES[spec.family].from_pretrained(init_from, dtype=torch.float32)
    return model, load_hf_processor(init_from), [*earlier.get("stages", []), _stage_summary(earlier)]


def _stage_summary(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("first_step", "steps", "spec", "final_loss", "heldout", "train_seconds", "threads")
    return {k: record[k] for k in keep if k in record}


def train(
    spec: ToySpec,
    seed: int,
    out: Path,
    *,
    threads: int = 2,
    log_every: int = 50,
    eval_every: int = 0,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train, evaluate on held-out items, save to `out`; returns the `training.json` record."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    model, processor, stages = initial_state(spec, seed, init_from)
    tokenizer = processor.tokenizer
    # A later stage continues the item stream and the task draws where the earlier ones stopped.
    first_step = sum(stage["steps"] for stage in stages)
    batch_sizes = {stage["spec"]["train"]["batch_size"] for stage in stages} | {spec.train.batch_size}
    if len(batch_sizes) > 1:
        raise ValueError("a continued run must keep the batch size (the item stream is indexed by step)")
    image_token_id = model.config.image_token_id
    encoder = ToyEncoder(spec.family, processor, image_token_id, spec.max_tiles)
    train_items = spec.data.dataset((first_step + spec.train.steps) * spec.train.batch_size, seed, "train")
    val_items = spec.data.dataset(spec.train.eval_items, seed, "val")
    optimizer = optimizer_for(model, spec)
    t = spec.train
    probe = ShapeProbe(model, spec, seed) if t.shape_probe else None
    if probe is not None:
        optimizer.add_param_group({"params": list(probe.head.parameters()), "weight_decay": 0.0})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    history, window = [], {task: [] for task in TASKS}
    model.train()
    dropout = torch.Generator().manual_seed(seed)
    handles = head_dropout_hooks(model, t.head_dropout, dropout) if t.head_dropout else []
    crowded = crowded_items(spec, seed)
    n_crowded = round(t.crowded_share * t.batch_size)
    for step in range(t.steps):
        dropout.manual_seed(seed * 1_000_003 + first_step + step)
        rng = np.random.default_rng([seed, first_step + step])
        items = [train_items[(first_step + step) * t.batch_size + j] for j in range(t.batch_size - n_crowded)]
        items += [next(crowded) for _ in range(n_crowded)]
        batch = training_batch(encoder, items, rng, t.task_weights, t.shape_negatives, spec.data.shapes)
        logits = model(**batch.model_inputs()).logits
        loss = answer_loss(logits, batch.labels)
        if probe is not None:
            probe_loss = probe.loss(items, batch.object_removed)
            window.setdefault("shape_probe", []).append(float(probe_loss.detach()))
            loss = loss + t.shape_probe * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        _record_task_losses(window, logits.detach(), batch)
        if (step + 1) % log_every == 0 or step + 1 == t.steps:
            entry = {"step": step + 1, "loss": float(loss.detach()), "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - start, 1)}
            entry |= {f"loss_{k}": float(np.mean(v)) for k, v in window.items() if v}
            window = {task: [] for task in TASKS}
            history.append(entry)
            print(json.dumps(entry), flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < t.steps:
            model.eval()
            quick = evaluate(hf_generate(model, processor, spec.family), [val_items[i] for i in range(48)], spec.family,
                             tasks=("localization", "list"))
            print(json.dumps({"step": step + 1, "quick_eval": {k: v for k, v in quick.items() if k != "answers"}}), flush=True)
            model.train()
    train_seconds = time.time() - start
    for handle in handles:
        handle.remove()
    if probe is not None:
        probe.remove()

    model.eval()
    metrics = evaluate(hf_generate(model, processor, spec.family), list(val_items), spec.family, shapes=spec.data.shapes)
    examples = metrics.pop("answers")[:5]
    save_checkpoint(out, model, processor, spec.family)
    record = {
        "family": spec.family,
        "seed": seed,
        "threads": threads,
        "spec": spec.to_json(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "first_step": first_step,
        "steps": t.steps,
        "stages": stages,  # earlier stages this run continued (--init-from), oldest first
        "final_loss": history[-1]["loss"],
        "history": history,
        "heldout": {"split": "val", "decoder": "transformers generate (greedy)", **metrics},
        "heldout_example_answers": examples,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    try:  # the same items decoded by HookedVLM (prepare + generate) from the saved checkpoint
        hooked = evaluate_shipped(str(out), "hooked", t.eval_items, "val")
        record_metrics(out, hooked)
        record["heldout_hooked"] = hooked
    except Exception as error:  # noqa: BLE001 - a loader gap must not lose the trained model
        print(f"HookedVLM evaluation failed: {error!r}", flush=True)
    return record


def crowded_items(spec: ToySpec, seed: int) -> Iterator[SyntheticItem]:
    """Training items whose image holds at least one distractor, in order, from their own split
    ("train-crowded": disjoint from "val" and "test"). In the toys' small images a distractor
    rarely finds room (14% of toy-llava's items), and naming the target among two objects is
    what the list and binary tasks get wrong: `crowded_share` makes those items common."""
    data = spec.data.dataset(2**62, seed, "train-crowded")
    return (item for item in map(data.__getitem__, itertools.count()) if len(item.objects) > 1)


class ShapeProbe:
    """An auxiliary loss on the image features entering the language model (the projector's
    output): a linear head, trained with the model and then discarded, classifies each image
    token as the shape of the object covering at least half of it, or as background (no object
    pixel); tokens partly covered, or over padding, carry no label. LLaVA ("pad" mode) and
    InternVL (every tile and the thumbnail, each token's box through the layout's geometry)."""

    def __init__(self, model, spec: ToySpec, seed: int):
        self.family = spec.family
        if model.config.model_type != spec.family:
            raise ValueError(f"a {spec.family} spec needs a {spec.family} model, got {model.config.model_type!r}")
        vision = model.config.vision_config
        if spec.family == "llava":
            self.pre = LlavaPreprocessing(image_size=vision.image_size, patch_size=vision.patch_size, image_mode="pad")
        else:
            side = internvl_family.square_side
            self.pre = InternVLPreprocessing(tile_size=side(vision.image_size, "image_size"), patch_size=side(vision.patch_size, "patch_size"),
                                             downsample_ratio=model.config.downsample_ratio, max_tiles=spec.max_tiles)  # fmt: skip
        self.shapes = spec.data.shapes
        d_model = model.config.text_config.hidden_size
        self.head = torch.nn.Linear(d_model, len(self.shapes) + 1)
        generator = torch.Generator().manual_seed(seed)  # the global RNG is not seeded in a continued stage
        with torch.no_grad():  # nn.Linear's own init range, drawn from the run's seed
            for param in self.head.parameters():
                param.uniform_(-(d_model**-0.5), d_model**-0.5, generator=generator)
        self.features: torch.Tensor | None = None
        self._boxes: dict[tuple[int, int], np.ndarray] = {}  # per image size: the toys have a few
        self._handle = model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output

    def remove(self) -> None:
        self._handle.remove()

    def token_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        """`[tokens, 4]` pixel boxes of the image's tokens, in the order the projector emits them."""
        if image_size not in self._boxes:
            if self.family == "llava":
                views = [llava_family.view_geometry(image_size, self.pre, "pad", has_cls=False)]
            else:
                grid = internvl_family.tile_grid(image_size, self.pre, self.pre.min_tiles, self.pre.max_tiles)
                views = internvl_family.view_geometries(image_size, self.pre, grid)
            self._boxes[image_size] = np.concatenate([view.token_boxes().reshape(-1, 4) for view in views])
        return self._boxes[image_size]

    def labels(self, item: SyntheticItem, object_removed: bool) -> torch.Tensor:
        objects = item.objects[1:] if object_removed else item.objects
        width, height = item.image_size
        labels = []
        for x1, y1, x2, y2 in self.token_boxes(item.image_size).round().astype(int):
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
            if x2 <= x1 or y2 <= y1:
                labels.append(IGNORE_INDEX)
                continue
            cover = [o.mask[y1:y2, x1:x2].mean() for o in objects]
            if not any(cover):
                labels.append(len(self.shapes))
            elif max(cover) >= 0.5:
                labels.append(self.shapes.index(objects[int(np.argmax(cover))].shape))
            else:
                labels.append(IGNORE_INDEX)
        return torch.tensor(labels)

    def loss(self, items: list[SyntheticItem], object_removed: list[bool]) -> torch.Tensor:
        per_item = [self.labels(i, r) for i, r in zip(items, object_removed)]
        # LLaVA: [batch, tokens]; InternVL: every view of every item in a row, as the projector saw them
        labels = torch.stack(per_item) if self.family == "llava" else torch.cat(per_item)
        if labels.numel() * self.features.shape[-1] != self.features.numel():
            raise RuntimeError(f"{labels.numel()} token labels for projector output {tuple(self.features.shape)}")
        logits = self.head(self.features.reshape(*labels.shape, -1))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def head_dropout_hooks(model, p: float, generator: torch.Generator) -> list:
    """Zero each language-model attention head's output (its slice of the `o_proj` input) for
    each example with probability `p`, in training mode only. A 16-head toy otherwise leans on a
    few indispensable heads; large models are redundant, which is what the paper's head-ablation
    controls assume."""
    text = model.model.language_model
    n_heads, d_head = text.config.num_attention_heads, text.config.head_dim

    def drop(module, args):
        if not module.training:
            return None
        (x,) = args
        b, pos, _ = x.shape
        keep = torch.rand(b, 1, n_heads, 1, generator=generator) >= p
        return ((x.view(b, pos, n_heads, d_head) * keep.to(x.dtype)).view(b, pos, -1),)

    return [layer.self_attn.o_proj.register_forward_pre_hook(drop) for layer in text.layers]


def _record_task_losses(window: dict[str, list[float]], logits: torch.Tensor, batch) -> None:
    """Per-task answer loss of this batch, for the log."""
    for task in TASKS:
        rows = [i for i, t in enumerate(batch.tasks) if t == task]
        if rows:
            window[task].append(float(answer_loss(logits[rows], batch.labels[rows])))


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) != len(TASKS) or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected {len(TASKS)} non-negative weights ({', '.join(TASKS)}), got {text!r}")
    return values


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`64x32,32x64` -> ((64, 32), (32, 64)): (width, height) pairs."""
    try:
        sizes = tuple(tuple(int(v) for v in size.split("x")) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(TOY_SPECS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it, see module doc)")
    parser.add_argument("--steps", type=int, help="override the spec's number of steps")
    parser.add_argument("--lr", type=float, help="override the spec's peak learning rate")
    parser.add_argument("--batch-size", type=int, help="override the spec's batch size")
    parser.add_argument("--eval-items", type=int, help="override the number of held-out items scored at the end")
    parser.add_argument("--init-from", type=Path, help="continue training a checkpoint written by this script")
    parser.add_argument("--task-weights", type=_floats, help="override the spec's localization,list,binary weights, e.g. 0.35,0.4,0.25")
    parser.add_argument("--image-sizes", type=_sizes, help="override the spec's image sizes, e.g. 64x32,32x64")
    parser.add_argument("--head-dropout", type=float, help="probability of zeroing a language-model head per example")
    parser.add_argument("--crowded-share", type=float, help="share of each batch drawn from items with a distractor")
    parser.add_argument("--shape-negatives", type=float, help="probability that a binary No asks for the target's colour in another shape")
    parser.add_argument("--shape-probe", type=float, help="weight of the auxiliary shape loss on the image features (LLaVA)")
    parser.add_argument("--eval-every", type=int, default=0, help="quick held-out eval every N steps (0: off)")
    args = parser.parse_args(argv)
    spec = TOY_SPECS[args.family]
    overrides = {
        k: v
        for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                     ("eval_items", args.eval_items), ("task_weights", args.task_weights), ("head_dropout", args.head_dropout),
                     ("crowded_share", args.crowded_share), ("shape_negatives", args.shape_negatives),
                     ("shape_probe", args.shape_probe))
        if v is not None
    }  # fmt: skip
    if overrides:
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, **overrides))
    if args.image_sizes:
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, image_sizes=args.image_sizes))
    record = train(spec, args.seed, args.out, threads=args.threads, eval_every=args.eval_every, init_from=args.init_from)
    print(json.dumps({k: record[k] for k in ("family", "seed", "steps", "final_loss", "heldout", "wall_seconds")}, indent=2))


if __name__ == "__main__":
    main()
