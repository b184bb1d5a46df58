"""`hooked-vlm view`: the viewer's page for one image and prompt, written to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from hooked_vlm.config import DTYPES
from hooked_vlm.viewer.collect import VISION_HEADS

EXAMPLE = "hooked-vlm view --model toy-internvl --image cat.jpg --prompt 'Where is the cat?' --max-new-tokens 16 --out view.html"


def add_view_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="attention drawn over the image: a self-contained HTML page",
        description="Attention over the original image for one image and prompt (and the generated answer): the "
        "language model's attention from any prompt or answer token, the vision tower's attention from any image "
        "cell, the logit lens at every image token. One HTML file, no network access needed to open it. "
        f"Example: {EXAMPLE}",
    )
    p.add_argument("--model", required=True, help="a shipped toy model, a local directory or a hub id")
    p.add_argument("--image", required=True, help="the image: a path or URL")
    p.add_argument("--prompt", required=True, help="the user's text (the chat template is applied)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generate an answer of up to N tokens and show its tokens too")
    p.add_argument("--layers", type=int, nargs="+", help="language-model layers to keep (default: all)")
    p.add_argument("--vision-layers", type=int, nargs="+", help="vision layers to keep (default: four, evenly spaced)")
    p.add_argument("--vision-heads", choices=VISION_HEADS, default="mean", help="vision attention per head, or averaged")
    p.add_argument("--lens-layers", type=int, nargs="+", help="layers of the logit lens (default: all)")
    p.add_argument("--max-megabytes", type=float, default=32.0,
                   help="attention kept at most (one byte per weight); default layers are thinned to fit, explicit ones refused")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--screenshot", help="also write a PNG of the page, drawn by headless Chromium (needs chromium, chromedriver, selenium)")
    p.set_defaults(run=run_view)


def run_view(args: argparse.Namespace) -> None:
    from hooked_vlm.model import HookedVLM
    from hooked_vlm.viewer.view import attention_view

    model = HookedVLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    view = attention_view(
        model, args.image, args.prompt, max_new_tokens=args.max_new_tokens, layers=args.layers,
        vision_layers=args.vision_layers, vision_heads=args.vision_heads, lens_layers=args.lens_layers,
        max_megabytes=args.max_megabytes, title=f"{args.model}: {args.prompt}",
    )  # fmt: skip
    path = view.save(args.out)
    answer = "".join(view.labels[view.answer_start :])
    print(f"answer: {answer!r}" if answer else "no answer generated (--max-new-tokens)")
    print(f"written {path.resolve()} ({path.stat().st_size / 2**20:.1f} MB): {len(view.queries)} query tokens, "
          f"{len(view.layers)} language-model layers, vision layers {view.vision_layers}")  # fmt: skip
    if args.screenshot:
        from hooked_vlm.viewer.browser import screenshot

        print(f"screenshot: {screenshot(path, Path(args.screenshot)).resolve()}")
