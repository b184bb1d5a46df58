"""The command-line options of each experiment (`hooked-vlm <experiment> --help`).

Every default is read from the experiment function's own signature, so the command line and
the function cannot drift apart (PROTOCOL-AUDIT A10): `hooked-vlm token-ablation` runs what
`token_ablation(model, data)` runs.
"""

from __future__ import annotations

import inspect
from typing import Callable

from hooked_vlm.boxes import FLOAT_BOXES
from hooked_vlm.experiments.attention_knockout import attention_knockout
from hooked_vlm.experiments.cumulative_head_ablation import CONTROLS, cumulative_head_ablation
from hooked_vlm.experiments.data import SAMPLE_MODES
from hooked_vlm.experiments.head_mediation import TOKEN_FILTERS, head_mediation
from hooked_vlm.experiments.object_extension import object_extension
from hooked_vlm.experiments.position_probe import position_probe
from hooked_vlm.experiments.token_ablation import FILLS, STRATEGIES, token_ablation
from hooked_vlm.experiments.token_shuffle import MODES, SCOPES, token_shuffle

SMALL_MODEL_LAYERS = 8  # below this, windows of 4 layers give at most one window besides "all"


def default(function: Callable, name: str):
    """The default of `function`'s parameter `name` (a tuple or range as a list)."""
    value = inspect.signature(function).parameters[name].default
    return list(value) if isinstance(value, (tuple, range)) else value


def sampling_options(p) -> None:
    """Which samples: every experiment's `limit`, `sample`, `sample_seed`."""
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples, a seeded random subset "
                                                           "(--sample, --sample-seed; COCO's file is ordered by class)")  # fmt: skip
    p.add_argument("--sample", choices=SAMPLE_MODES, default="random",
                   help="how --limit chooses: random (default), stratified (classes take turns) or first (file order)")  # fmt: skip
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --limit subset")


def answer_options(p) -> None:
    """How answers are generated and read (`evaluate`'s options)."""
    p.add_argument("--frame", choices=["padded", "crop", "original"], default=None,
                   help="LLaVA's box frame (default: the model's image mode: padded in pad mode, crop in crop mode)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length cap (default per task: 64 localization, 128 list)")
    p.add_argument("--match", choices=["word", "substring"], default="word",
                   help="list task: whole words with plurals, or the paper's literal substring test")  # fmt: skip
    float_boxes_option(p)


def float_boxes_option(p) -> None:
    p.add_argument("--float-boxes", choices=FLOAT_BOXES, default="official",
                   help="InternVL: a box whose numbers sum to < 4 ([0, 1] floats) is read as fractions of the image, as "
                        "InternVL's evaluator does (official), or on the 0-1000 scale like any other (thousandths)")  # fmt: skip


def _task(p, choices=("localization", "list")) -> None:
    p.add_argument("--task", choices=choices, default=choices[0])


def _ints(p, name: str, default: list[int], help_text: str) -> None:
    p.add_argument(name, type=int, nargs="+", default=default, help=help_text)


def evaluate_options(p) -> None:
    _task(p, ("localization", "list", "binary"))
    answer_options(p)


def token_ablation_options(p) -> None:
    _task(p)
    answer_options(p)
    fn = token_ablation
    p.add_argument("--strategies", nargs="+", default=default(fn, "strategies"), choices=STRATEGIES)
    _ints(p, "--paddings", default(fn, "paddings"), "object padding in token rings")
    p.add_argument("--fractions", type=float, nargs="+", default=default(fn, "fractions"), help="random/IG shares of image tokens")
    _ints(p, "--seeds", default(fn, "seeds"), "random seeds")
    p.add_argument("--fill", choices=FILLS, default=default(fn, "fill"))
    p.add_argument("--mean", help="mean visual embedding saved by interventions.save_mean or mean-embedding (default: "
                                  "synthetic data uses the toy distribution's 'mean' split; COCO the dataset's distinct "
                                  "images, with a warning: the paper averages ImageNet-val)")  # fmt: skip
    p.add_argument("--views", choices=["all", "global", "local"], default=default(fn, "views"))
    p.add_argument("--ig-steps", type=int, default=default(fn, "ig_steps"), help="Integrated Gradients steps")
    p.add_argument("--ig-baseline", choices=["mean", "zero"], default=default(fn, "ig_baseline"))
    p.add_argument("--ig-rank", choices=["signed", "abs"], default=default(fn, "ig_rank"))
    p.add_argument("--ig-reduce", choices=["l1", "sum"], default=default(fn, "ig_reduce"),
                   help="a token's attribution over d_model: sum of |.| (the reference code) or signed sum")  # fmt: skip
    p.add_argument("--ig-target", choices=["answer", "first_logit"], default=default(fn, "ig_target"),
                   help="the answer's mean log-probability, or (list) the class's first-token logit")  # fmt: skip
    p.add_argument("--register-sd", type=float, default=default(fn, "register_sd"), help="register tokens: norm > mean + this many sd")


def token_shuffle_options(p) -> None:
    _task(p)
    answer_options(p)
    p.add_argument("--modes", nargs="+", choices=MODES, default=default(token_shuffle, "modes"))
    _ints(p, "--seeds", default(token_shuffle, "seeds"), "random seeds")
    p.add_argument("--scope", choices=SCOPES, default=default(token_shuffle, "scope"),
                   help="InternVL: shuffle within each tile (view), the joined tiles and the thumbnail apart (sheet), or the whole image")  # fmt: skip


def object_extension_options(p) -> None:
    answer_options(p)
    _ints(p, "--paddings", default(object_extension, "paddings"), "rings of copied object tokens (0: the unmodified model)")
    _ints(p, "--gt-scales", default(object_extension, "gt_scales"), "GT box growth in token widths")
    _ints(p, "--seeds", default(object_extension, "seeds"), "random seeds")
    p.add_argument("--views", choices=["all", "global", "local"], default=default(object_extension, "views"))
    p.add_argument("--scale-view", choices=["global", "local"], default=default(object_extension, "scale_view"),
                   help="InternVL: whose token size grows the GT box")  # fmt: skip


def knockout_options(p) -> None:
    _task(p)
    answer_options(p)
    p.add_argument("--group-size", nargs="+", default=None,
                   help=f"layer group sizes, or 'all' (default: 4 and all; 1 and all below {SMALL_MODEL_LAYERS} layers)")  # fmt: skip
    _ints(p, "--paddings", default(attention_knockout, "paddings"), "object padding in token rings")
    p.add_argument("--controls", nargs="*", choices=["random"], default=default(attention_knockout, "controls"),
                   help="the size-matched random control (give none to skip it)")  # fmt: skip
    _ints(p, "--seeds", default(attention_knockout, "seeds"), "random seeds of the size-matched control")
    p.add_argument("--exclude-object", action="store_true", help="draw the random control outside the object")


def _mediation_options(p) -> None:
    p.add_argument("--method", choices=["exact", "attribution"], default=default(head_mediation, "method"))
    p.add_argument("--target", choices=["src_greedy", "gt"], default=default(head_mediation, "target"))
    p.add_argument("--positions", choices=["prompt", "answer", "prompt+answer"], default=default(head_mediation, "positions"))
    p.add_argument("--token-filter", choices=TOKEN_FILTERS, default=default(head_mediation, "token_filter"),
                   help="localization: score every digit of the box, or leave out LLaVA's leading 0 of each fraction")  # fmt: skip
    p.add_argument("--min-effect", type=float, default=default(head_mediation, "min_effect"),
                   help="pairs whose source and base perplexities differ by less (relative) get MF NaN")  # fmt: skip
    p.add_argument("--mediation-max-new-tokens", type=int, default=default(head_mediation, "max_new_tokens"),
                   help="length cap of the source's greedy answer")  # fmt: skip


def mediation_options(p) -> None:
    _task(p, ("localization", "binary"))
    p.add_argument("--frame", choices=["padded", "crop", "original"], default=None, help="LLaVA's box frame (default: the model's)")
    float_boxes_option(p)
    _mediation_options(p)
    p.set_defaults(limit=default(head_mediation, "limit"))  # the protocol's 50 pairs, drawn at random


def cumulative_options(p) -> None:
    _task(p, ("localization", "list", "binary"))
    answer_options(p)
    p.add_argument("--ranking", help="a head-mediation output folder, or its results.csv or summary.csv "
                                     "(default: run head mediation on the same samples first)")  # fmt: skip
    p.add_argument("--fractions", type=float, nargs="+", default=default(cumulative_head_ablation, "fractions"), help="shares of heads removed")
    p.add_argument("--value", choices=["zero", "mean"], default=default(cumulative_head_ablation, "value"), help="what an ablated head outputs")
    p.add_argument("--controls", nargs="*", choices=CONTROLS, default=default(cumulative_head_ablation, "controls"),
                   help="control orders of the same heads: least |MF|, most negative MF, random (seeded by --sample-seed)")  # fmt: skip
    _mediation_options(p)


def probe_options(p) -> None:
    from hooked_vlm.data.commands import collection_arguments

    p.add_argument("--epochs", type=int, default=default(position_probe, "epochs"))
    p.add_argument("--tokens-per-image", type=int, default=default(position_probe, "tokens_per_image"),
                   help="tokens drawn per image and view in each pass")  # fmt: skip
    p.add_argument("--lr", type=float, default=default(position_probe, "lr"), help="the probes' Adam learning rate")
    collection_arguments(p)
    collection_arguments(p, prefix="test-")
    p.add_argument("--test-split", default=None, help="the datasets split of --test-collection")
    p.add_argument("--n-train", type=int, default=50_000, help="--collection images to train on (the paper's 50,000)")
    p.add_argument("--n-test", type=int, default=10_000, help="images to score on (the paper's 10,000)")
