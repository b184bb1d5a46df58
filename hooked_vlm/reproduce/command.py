"""`hooked-vlm reproduce`: the command line of `hooked_vlm.reproduce.reproduce`."""

from __future__ import annotations

import argparse
from pathlib import Path

from hooked_vlm.config import DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    from hooked_vlm import reproduce as package
    from hooked_vlm.reproduce.parts import PARTS

    p = sub.add_parser("reproduce", help="the paper's tables and figures on one or more models, as one report",
                       description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", action="append", required=True, help="a model (repeat for each)")
    p.add_argument("--out", required=True, help="the report's folder (rerun to resume)")
    p.add_argument("--coco", help="COCO-style instance annotations (JSON)")
    p.add_argument("--images", help="the annotations' image folder")
    p.add_argument("--removed", help="folder of object-removed images (hooked-vlm remove-objects)")
    p.add_argument("--pairs", help="a control-set manifest (hooked-vlm control-set): its kept pairs are the data")
    p.add_argument("--imagenet", help="image folder for the mean visual embedding (the paper's: ImageNet val)")
    p.add_argument("--imagenet-limit", type=int, default=None, help="the first N images of --imagenet only")
    p.add_argument("--only", default=None, help=f"comma-separated parts (default: all): {','.join(PARTS)}")
    p.add_argument("--settings", choices=["paper", "checkpoint"], default="paper",
                   help="prompt settings: the paper's (pad / 6 tiles, each model's own template) or each checkpoint's own")  # fmt: skip
    p.add_argument("--filters", choices=["paper", "none"], default="paper", help="COCO object filters without --pairs")
    p.add_argument("--limit", type=int, default=None, help="N samples of every part, a seeded random subset (a quick run)")
    p.add_argument("--cma-pairs", type=int, default=50, help="pairs for causal mediation, drawn with --seed (the paper's 50)")
    p.add_argument("--ig-steps", type=int, default=50, help="integrated-gradients steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_reproduce)


def _reproduce(args) -> None:
    from hooked_vlm.reproduce import reproduce
    from hooked_vlm.runs import RunBusy, RunMismatch

    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else None
    try:
        report = reproduce(args.model, out=args.out, coco=args.coco, images=args.images, removed=args.removed, pairs=args.pairs,
                           imagenet=args.imagenet, imagenet_limit=args.imagenet_limit, only=only, settings=args.settings,
                           filters=args.filters, limit=args.limit, cma_pairs=args.cma_pairs, ig_steps=args.ig_steps,
                           seed=args.seed, dtype=DTYPES[args.dtype], device=args.device, batch_size=args.batch_size)  # fmt: skip
    except (ValueError, RunMismatch, RunBusy) as error:
        raise SystemExit(f"hooked-vlm reproduce: {error}") from None
    print(f"report written to {Path(report).resolve()}")
