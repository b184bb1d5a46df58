"""The data subcommands of `hooked-vlm`: what the experiments run on, made from raw data.

    hooked-vlm remove-objects --coco ann.json --images val2017/ --out removed/ [--inpainter lama]
    hooked-vlm control-set --model A --model B --coco ann.json --images val2017/ --removed removed/ --out control.json
    hooked-vlm mean-embedding --model M --collection imagenet/val --out mean.pt

`register(subparsers)` adds them to the command line (`hooked_vlm.cli`); `collection_arguments`
and `probe_collections` give `position-probe` its image collections.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hooked_vlm import prompt_settings
from hooked_vlm.config import DTYPES

FILTERS = ("paper", "none")


def register(sub: argparse._SubParsersAction) -> None:
    removal = sub.add_parser("remove-objects", help="inpaint each selected object out of its image (the object-removed twins)",
                             description=_doc("hooked_vlm.data.removal"), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _coco_arguments(removal)
    removal.add_argument("--out", required=True, help="folder of the object-removed images ({image_id}_{ann_id}.png)")
    removal.add_argument("--inpainter", choices=["opencv", "lama"], default="opencv",
                         help="opencv: classical, offline (default); lama: the paper's (needs big-lama.pt, see --lama-weights)")  # fmt: skip
    removal.add_argument("--method", choices=["telea", "ns"], default="telea", help="OpenCV's method")
    removal.add_argument("--radius", type=int, default=5, help="OpenCV's neighbourhood in pixels")
    removal.add_argument("--lama-weights", help="LaMa's TorchScript big-lama.pt (default: $LAMA_MODEL, torch's hub cache, or a download)")
    removal.add_argument("--dilation", type=int, default=5, help="pixels the mask is grown by before inpainting")
    removal.add_argument("--device", default=None, help="LaMa's device (default: cuda when available)")
    removal.add_argument("--overwrite", action="store_true", help="redo objects already in --out (e.g. with other settings)")
    removal.set_defaults(run=_remove_objects)

    control = sub.add_parser("control-set", help="the pairs every model recognises in the original and misses without the object",
                             description=_doc("hooked_vlm.data.control_set"), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    control.add_argument("--model", action="append", required=True, help="a model (repeat for each: the set is the intersection)")
    _coco_arguments(control)
    control.add_argument("--removed", required=True, help="folder of object-removed images (hooked-vlm remove-objects)")
    control.add_argument("--out", required=True, help="the manifest (JSON) that experiments read with --pairs")
    control.add_argument("--task", choices=["list", "binary"], default="list", help="list: the paper's rule; binary: yes/no")
    control.add_argument("--max-new-tokens", type=int, default=None, help="default: evaluate's for the task")
    control.add_argument("--batch-size", type=int, default=8)
    control.add_argument("--dtype", choices=DTYPES, default="float32")
    control.add_argument("--device", default="cpu")
    prompt_settings.add_arguments(control)
    control.set_defaults(run=_control_set)

    mean = sub.add_parser("mean-embedding", help="the mean visual embedding over an image collection (the paper's: ImageNet val)",
                          description=_doc("hooked_vlm.interventions.means"), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mean.add_argument("--model", required=True)
    collection_arguments(mean, required=True)
    mean.add_argument("--limit", type=int, default=None, help="the first N images only")
    mean.add_argument("--hook", default="hook_inputs_embeds", help="where the mean is taken (default: the LM input, the paper's)")
    mean.add_argument("--views", choices=["all", "global", "local"], default="all")
    mean.add_argument("--batch-size", type=int, default=8)
    mean.add_argument("--dtype", choices=DTYPES, default="float32")
    mean.add_argument("--device", default="cpu")
    mean.add_argument("--out", required=True, help="the mean's file (.pt), which token-ablation reads with --mean")
    prompt_settings.add_arguments(mean)
    mean.set_defaults(run=_mean_embedding)


def collection_arguments(p: argparse.ArgumentParser, *, required: bool = False, prefix: str = "") -> None:
    """--collection (a folder of images, a saved `datasets` dataset, or hf:NAME[:CONFIG]),
    --split and --image-column for the `datasets` ones."""
    p.add_argument(f"--{prefix}collection", required=required,
                   help="images: a folder (flat or class subfolders), a saved datasets dataset, or hf:NAME[:CONFIG] (streamed)")  # fmt: skip
    if not prefix:
        p.add_argument("--split", default=None, help="the datasets split (hf: sources)")
        p.add_argument("--image-column", default="image", help="the datasets column holding the images")


def _doc(module: str) -> str:
    import importlib

    return importlib.import_module(module).__doc__ or ""


def _coco_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", required=True, help="COCO-style instance annotations (JSON)")
    p.add_argument("--images", required=True, help="the annotations' image folder")
    p.add_argument("--filters", choices=FILTERS, default="paper",
                   help="paper: the paper's object filters (§1.2); none: every non-crowd annotation")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="the first N selected annotations only")


def load_filtered_coco(annotation_file, image_dir, filters: str = "paper", limit: int | None = None):
    """The COCO subset a data command works on: the paper's filters or none, then `limit`."""
    from hooked_vlm.data.coco import CocoSubset, load_coco

    if filters not in FILTERS:
        raise ValueError(f"filters must be one of {FILTERS}, got {filters!r}")
    options = {} if filters == "paper" else dict(min_area=0, max_area=1, min_short_side=0, unique_category=False)
    subset = load_coco(annotation_file, image_dir, **options)
    if limit is not None:
        subset = CocoSubset(subset.items[:limit], subset.report, subset.categories)
    return subset


def _remove_objects(args) -> None:
    from hooked_vlm.data.inpainters import LamaInpainter, OpenCVInpainter
    from hooked_vlm.data.removal import remove_objects

    subset = load_filtered_coco(args.coco, args.images, args.filters, args.limit)
    if args.inpainter == "lama":
        inpainter = LamaInpainter(args.lama_weights, device=args.device)
    else:
        inpainter = OpenCVInpainter(args.method, args.radius)
    report = remove_objects(subset, args.out, inpainter=inpainter, dilation=args.dilation, overwrite=args.overwrite)
    print(f"{len(report.written)} written, {len(report.skipped)} already there, {len(report.empty_mask)} with an empty mask; "
          f"{len(subset)} selected annotations in {Path(args.out).resolve()}")  # fmt: skip



def _control_set(args) -> None:
    from hooked_vlm.data.control_set import build_control_set

    subset = load_filtered_coco(args.coco, args.images, args.filters, args.limit)
    source = {"coco": str(Path(args.coco).resolve()), "images": str(Path(args.images).resolve()),
              "filters": args.filters, "limit": args.limit}  # fmt: skip
    control = build_control_set(args.model, subset, Path(args.removed).resolve(), task=args.task, out=args.out,
                                dtype=DTYPES[args.dtype], device=args.device, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, source=source,
                                preprocessing=prompt_settings.requested(args))  # fmt: skip
    counts = control.manifest["counts"]
    for model in control.manifest["models"]:
        print(f"{model['name']}: keeps {model['counts']['kept']}, misses {model['counts']['missed_in_original']} in the original, "
              f"still recognises {model['counts']['recognised_without_object']} without the object")  # fmt: skip
    print(f"control set: {counts['kept']} of {counts['candidates']} annotations ({counts['kept_images']} images; "
          f"{counts['candidates'] - counts['with_removed_image']} without an object-removed image) -> {Path(args.out).resolve()}")  # fmt: skip


def _mean_embedding(args) -> None:
    from hooked_vlm import interventions as iv
    from hooked_vlm.data.collections import open_collection
    from hooked_vlm.model import HookedVLM

    images = open_collection(args.collection, split=args.split, image_column=args.image_column, limit=args.limit)
    model = HookedVLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    model.use_settings(prompt_settings.from_arguments(model, args))
    mean = iv.compute_mean_embedding(model, images, hook=args.hook, views=args.views, batch_size=args.batch_size)
    iv.save_mean(mean, args.out)
    used = mean.provenance["images"]
    print(f"mean of {args.hook} over {mean.count} image tokens of {used['count']} images (digest {used['digest']}) "
          f"-> {Path(args.out).resolve()}")  # fmt: skip


def probe_collections(args) -> tuple:
    """--collection's images: --n-train to train on and --n-test others to score on (a seeded
    draw), or --n-test images of --test-collection."""
    from hooked_vlm.data.collections import open_collection, sample_collection, split_collection

    images = open_collection(args.collection, split=args.split, image_column=args.image_column)
    if not args.test_collection:
        return split_collection(images, args.n_train, args.n_test, seed=args.seed)
    test = open_collection(args.test_collection, split=args.test_split, image_column=args.image_column)
    return sample_collection(images, args.n_train, seed=args.seed), sample_collection(test, args.n_test, seed=args.seed)
