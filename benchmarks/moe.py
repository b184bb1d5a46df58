"""Speed of the hooked mixture-of-experts language model against transformers, side by side.

    python benchmarks/moe.py            # mid-size MoE InternVL (a few minutes on 2 CPU cores)
    python benchmarks/moe.py --quick    # small, a smoke run (to results_moe_quick.json)

Builds a random InternVL checkpoint whose language model is a Qwen3-MoE (`hooked_vlm.testing`),
loads it three times in transformers (eager attention with its default `grouped_mm` experts or
with its eager experts; and its defaults, SDPA and `grouped_mm`) and once hooked, and times them
interleaved in one process (`run.interleaved`: every round runs each function once, in a new
order; medians compared), so machine load hits all alike.
Every figure is a ratio against a reference measured in the same run. Results: stdout and
`benchmarks/results_moe.json` (`--quick`: `results_moe_quick.json`). See `benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from run import ASSETS, PROMPT, hf_kwargs, interleaved, with_eager_attention  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.patching import answer_nll_metric, expert_attribution  # noqa: E402
from hooked_vlm.testing import build_tiny_internvl  # noqa: E402

# Qwen3-30B-A3B's proportions at a CPU-friendly width: expert width 3/8 of d_model, 1/16 of the
# experts per token (there: 128 experts of 768 for d_model 2048, top-8), every layer sparse.
SIZES = {
    "mid": dict(d_model=512, n_layers=8, n_heads=8, n_key_value_heads=2, d_head=64, num_experts=64, experts_per_token=4,
                d_mlp_expert=192, vision_d_model=256, vision_d_mlp=1024, vision_layers=4, vision_heads=4, image_size=448,
                patch_size=14, max_patches=6),
    "quick": dict(d_model=128, n_layers=4, n_heads=4, n_key_value_heads=2, d_head=32, num_experts=16, experts_per_token=2,
                  d_mlp_expert=48, vision_d_model=64, vision_d_mlp=128, vision_layers=2, vision_heads=2, image_size=112,
                  patch_size=14, max_patches=6),
}  # fmt: skip
ANSWER = "<ref>cat</ref><box>[[120, 300, 550, 910]]</box>"


def reference(path: Path, experts: str | None, attention: str = "eager"):
    """The HF model with `attention` and `experts` ("eager"; None: transformers' default,
    `grouped_mm` where PyTorch has it, which asking for it by name on InternVL refuses)."""
    from transformers import InternVLForConditionalGeneration

    extra = {} if experts is None else {"experts_implementation": experts}
    model = InternVLForConditionalGeneration.from_pretrained(path, attn_implementation=attention, **extra).eval()
    assert model.model.language_model.config._experts_implementation == (experts or "grouped_mm")
    return model


@torch.no_grad()
def bench(path: Path, reps: int) -> dict:
    hooked = HookedVLM.from_pretrained(path)
    hf_grouped, hf_eager, hf_default = reference(path, None), reference(path, "eager"), reference(path, None, "sdpa")
    inputs = hooked.prepare(Image.open(ASSETS / "chelsea.jpg"), PROMPT)
    routing = lambda name: name.endswith("mlp.hook_router_weights")  # noqa: E731

    t = interleaved(
        {
            "hf_grouped": lambda: hf_grouped(**hf_kwargs(inputs)),
            "hf_eager": lambda: hf_eager(**hf_kwargs(inputs)),
            "hf_default": lambda: hf_default(**hf_kwargs(inputs)),  # transformers' defaults: SDPA, grouped_mm
            "hooked": lambda: hooked(inputs),
            "hooked_eager": with_eager_attention(hooked, lambda: hooked(inputs)),  # and one expert at a time
            "cache_all": lambda: hooked.run_with_cache(inputs),
            "cache_routing": lambda: hooked.run_with_cache(inputs, names_filter=routing),
        },
        reps,
    )
    logits, cache = hooked.run_with_cache(inputs)
    scale = logits.abs().max().item()
    out = {
        "sequence_length": inputs.input_ids.shape[1],
        "views": inputs.pixel_values.shape[0],
        "hf_grouped_forward_s": t["hf_grouped"],
        "forward_ratio_vs_hf_grouped": t["hooked"] / t["hf_grouped"],
        "forward_ratio_vs_hf_eager": t["hooked"] / t["hf_eager"],
        "forward_eager_ratio_vs_hf_eager": t["hooked_eager"] / t["hf_eager"],
        "hf_eager_ratio_vs_hf_grouped": t["hf_eager"] / t["hf_grouped"],
        "forward_ratio_vs_hf_default": t["hooked"] / t["hf_default"],
        "cache_all_ratio_vs_forward": t["cache_all"] / t["hooked"],
        "cache_routing_ratio_vs_forward": t["cache_routing"] / t["hooked"],
        "cache_all_mb": sum(v.numel() * v.element_size() for v in cache.cache_dict.values()) / 2**20,
        "logits_rel_diff_vs_hf_eager": (logits - hf_eager(**hf_kwargs(inputs)).logits).abs().max().item() / scale,
    }
    cat = Image.open(ASSETS / "chelsea.jpg")
    base = hooked.prepare(Image.open(ASSETS / "coffee.jpg").resize(cat.size), PROMPT, answers=ANSWER)  # same token layout
    source = hooked.prepare(cat, PROMPT, answers=ANSWER)
    metric = answer_nll_metric(base)
    a = interleaved(
        {"forward": lambda: hooked(base), "attribution": lambda: expert_attribution(hooked, base, source, metric)},
        max(1, reps // 2),
    )
    return out | {"expert_attribution_ratio_vs_forward": a["attribution"] / a["forward"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, a smoke run")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "mid"
    with tempfile.TemporaryDirectory() as root:
        path = build_tiny_internvl(Path(root) / f"moe-{size}", seed=0, init_gain=1.0, **SIZES[size])
        results = {"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__, "config": SIZES[size]}
        results |= bench(path, args.reps)
    for key, value in results.items():
        print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
    out = args.out or Path(__file__).parent / ("results_moe_quick.json" if args.quick else "results_moe.json")
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
