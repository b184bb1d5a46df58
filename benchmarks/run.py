"""Speed and memory of hooked_vlm against the Hugging Face eager forward, measured side by side.

    python benchmarks/run.py            # mid-size models (about 12 minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # small models, a smoke run (to results_quick.json)

Builds mid-size random checkpoints of both families (LLaVA: a 336 px CLIP tower, ~600-token
sequences; InternVL: 448 px tiles, several tiles + thumbnail) with `hooked_vlm.testing`, then
reports every figure as a ratio against the reference measured in the same run: timings are
interleaved (each round runs every function once, in a shuffled order) and the median of each is
taken, so machine load affects all alike. `run_with_cache` keeps freed memory for reuse by default
(`hooked_vlm.allocator`); the cache ratios are measured a second time in a child process that opts
out (`HOOKED_VLM_KEEP_FREED_MEMORY=0`), with glibc's own malloc policy. Results go to stdout, as a
side-by-side table at the end, and to `benchmarks/results.json` (the committed reference figures;
`--quick` writes `benchmarks/results_quick.json` instead, `--out` elsewhere). See
`benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_memory_mb  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.allocator import OPT_OUT_VARIABLE  # noqa: E402
from hooked_vlm.patching import answer_nll_metric, head_attribution, head_patching_sweep, naive_head_patching  # noqa: E402
from hooked_vlm.testing import build_tiny_internvl, build_tiny_llava  # noqa: E402

ASSETS = Path(__file__).parents[1] / "tests" / "assets"
PROMPT = "Please provide the bounding box coordinates of the cat."
ANSWER = {"llava": "[0.12, 0.30, 0.55, 0.91]", "internvl": "<ref>cat</ref><box>[[120, 300, 550, 910]]</box>"}

SIZES = {
    "mid": {
        "llava": dict(d_model=512, d_mlp=1376, n_layers=8, n_heads=8, vision_d_model=256, vision_d_mlp=1024,
                      vision_layers=8, vision_heads=4, image_size=336, patch_size=14),
        "internvl": dict(d_model=512, d_mlp=1536, n_layers=8, n_heads=8, n_key_value_heads=2, d_head=64,
                         vision_d_model=256, vision_d_mlp=1024, vision_layers=6, vision_heads=4, image_size=448,
                         patch_size=14, max_patches=6),
    },
    "quick": {
        "llava": dict(d_model=128, d_mlp=256, n_layers=4, n_heads=4, vision_d_model=64, vision_d_mlp=128,
                      vision_layers=3, vision_heads=2, image_size=112, patch_size=14),
        "internvl": dict(d_model=128, d_mlp=256, n_layers=4, n_heads=4, n_key_value_heads=2, d_head=32,
                         vision_d_model=64, vision_d_mlp=128, vision_layers=2, vision_heads=2, image_size=112,
                         patch_size=14, max_patches=6),
    },
}  # fmt: skip


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, run in turn `reps` times after one warm-up each. Each
    round runs them in a new (seeded) order, so that none always follows the same one: a full
    cache leaves the allocator in another state than a forward does."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def with_eager_attention(hooked: HookedVLM, fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with `set_attention_implementation("eager")` (patterns materialised; MoE experts
    one at a time in expert order), then back to "auto"."""

    def run():
        hooked.set_attention_implementation("eager")
        try:
            return fn()
        finally:
            hooked.set_attention_implementation("auto")

    return run


def build(family: str, size: str, root: Path) -> Path:
    path = root / f"{family}-{size}"
    builder = build_tiny_llava if family == "llava" else build_tiny_internvl
    return builder(path, seed=0, init_gain=1.0, **SIZES[size][family])


def reference_model(family: str, path: Path, attn: str = "eager"):
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else InternVLForConditionalGeneration
    return cls.from_pretrained(path, attn_implementation=attn).eval()


def hf_kwargs(inputs) -> dict:
    return dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)


@torch.no_grad()
def bench_forward(family: str, path: Path, reps: int) -> dict:
    """Forward, caches and generation of the hooked model vs the HF eager forward."""
    hooked = HookedVLM.from_pretrained(path)
    reference = reference_model(family, path)
    image = Image.open(ASSETS / "chelsea.jpg")
    inputs = hooked.prepare(image, PROMPT)
    resid_only = lambda name: name.endswith("hook_resid_post") and not name.startswith("vision.")  # noqa: E731
    eager = lambda fn: with_eager_attention(hooked, fn)  # noqa: E731

    t = interleaved(
        {
            "hf_eager": lambda: reference(**hf_kwargs(inputs)),
            # the reference's own way of keeping activations: every hidden state and attention map
            "hf_all_outputs": lambda: reference(**hf_kwargs(inputs), output_hidden_states=True, output_attentions=True),
            "hooked": lambda: hooked(inputs),
            "hooked_eager": eager(lambda: hooked(inputs)),
            "cache_all": lambda: hooked.run_with_cache(inputs),
            "cache_filtered": lambda: hooked.run_with_cache(inputs, names_filter=resid_only),
        },
        reps,
    )
    _, cache = hooked.run_with_cache(inputs)
    _, filtered = hooked.run_with_cache(inputs, names_filter=resid_only)
    hf_outputs = reference(**hf_kwargs(inputs), output_hidden_states=True, output_attentions=True)
    hf_tensors = [t for v in hf_outputs.values() for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t)]
    out = {
        "sequence_length": inputs.input_ids.shape[1],
        "image_tokens": len(inputs.layout),
        "views": inputs.pixel_values.shape[0],
        "hf_eager_forward_s": t["hf_eager"],
        "forward_ratio": t["hooked"] / t["hf_eager"],
        "forward_eager_ratio": t["hooked_eager"] / t["hf_eager"],
        "cache_all_ratio_vs_forward": t["cache_all"] / t["hooked"],
        "cache_all_ratio_vs_hf": t["cache_all"] / t["hf_eager"],
        "hf_all_outputs_ratio_vs_hf": t["hf_all_outputs"] / t["hf_eager"],
        "cache_filtered_ratio_vs_forward": t["cache_filtered"] / t["hooked"],
        "cache_all_entries": len(cache),
        "cache_all_mb": _mb(cache.cache_dict.values()),
        "cache_filtered_mb": _mb(filtered.cache_dict.values()),
        "hf_all_outputs_mb": _mb(hf_tensors),
    }
    new_tokens = 24
    g = interleaved(
        {
            "hf": lambda: reference.generate(**hf_kwargs(inputs) | {"position_ids": None}, max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens, do_sample=False),
            "hooked": lambda: hooked.generate(inputs, max_new_tokens=new_tokens, return_tokens=True),
        },
        max(1, reps // 2),
    )  # fmt: skip
    out["generation_tokens_per_s_hf"] = new_tokens / g["hf"]
    out["generation_speed_ratio"] = g["hf"] / g["hooked"]  # > 1: hooked is faster
    if family == "llava":
        out |= bench_transformer_bridge(path, inputs, t["hf_eager"], reps)
    return out | bench_nnsight(reference, inputs, reps)


@torch.no_grad()
def bench_caches(path: Path, reps: int) -> dict:
    """Forward and caches of the hooked model alone (for the run with glibc's own policy)."""
    hooked = HookedVLM.from_pretrained(path)
    inputs = hooked.prepare(Image.open(ASSETS / "chelsea.jpg"), PROMPT)
    resid_only = lambda name: name.endswith("hook_resid_post") and not name.startswith("vision.")  # noqa: E731
    t = interleaved(
        {
            "hooked": lambda: hooked(inputs),
            "cache_all": lambda: hooked.run_with_cache(inputs),
            "cache_filtered": lambda: hooked.run_with_cache(inputs, names_filter=resid_only),
        },
        reps,
    )
    return {"cache_all_ratio_vs_forward": t["cache_all"] / t["hooked"], "cache_filtered_ratio_vs_forward": t["cache_filtered"] / t["hooked"]}


def bench_caches_with_glibc_defaults(path: Path, reps: int) -> dict:
    """`bench_caches` in a child process that opts out of keeping freed memory (malloc's policy
    is process-wide: this process has it on since its first `run_with_cache`)."""
    command = [sys.executable, __file__, "--caches-only", str(path), "--reps", str(reps)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ | {OPT_OUT_VARIABLE: "0"})
    ratios = json.loads(done.stdout.strip().splitlines()[-1])
    return {f"glibc_defaults_{key}": value for key, value in ratios.items()}


def bench_transformer_bridge(path: Path, inputs, hf_seconds: float, reps: int) -> dict:
    """TransformerLens 4.3's TransformerBridge on the same LLaVA checkpoint, when it boots."""
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
        t = interleaved(
            {
                "forward": lambda: bridge(inputs.input_ids, pixel_values=inputs.pixel_values),
                "cache": lambda: bridge.run_with_cache(inputs.input_ids, pixel_values=inputs.pixel_values),
            },
            reps,
        )
    except Exception as error:  # report, don't fail: the peer is optional
        return {"transformer_bridge": f"did not run: {type(error).__name__}: {error}"}
    return {"bridge_forward_ratio_vs_hf": t["forward"] / hf_seconds, "bridge_cache_ratio_vs_hf": t["cache"] / hf_seconds}


def bench_nnsight(reference, inputs, reps: int) -> dict:
    """nnsight on the Hugging Face eager model (the one `bench_forward` timed, wrapped last): a
    bare trace, the residual stream of every LM layer saved (the filtered cache's content), and
    `tracer.cache()` of every module's output."""
    try:
        import nnsight
        from nnsight import NNsight

        wrapped = NNsight(reference)
        layers = wrapped.model.language_model.layers

        def trace():
            with wrapped.trace(**hf_kwargs(inputs)):
                logits = wrapped.output.logits.save()
            return logits

        def resid():
            with wrapped.trace(**hf_kwargs(inputs)):
                saved = nnsight.save([])
                for layer in layers:
                    saved.append(layer.output)
            return saved

        def cache():
            with wrapped.trace(**hf_kwargs(inputs)) as tracer:
                saved = tracer.cache(device=None)
            return saved

        with torch.no_grad():
            t = interleaved({"hf": lambda: reference(**hf_kwargs(inputs)), "trace": trace, "resid": resid, "cache": cache}, reps)
    except Exception as error:  # report, don't fail: the peer is optional
        return {"nnsight": f"did not run: {type(error).__name__}: {error}"}
    return {
        "nnsight_version": nnsight.__version__,
        "nnsight_trace_ratio_vs_hf": t["trace"] / t["hf"],
        "nnsight_resid_ratio_vs_hf": t["resid"] / t["hf"],
        "nnsight_cache_ratio_vs_hf": t["cache"] / t["hf"],
    }


def bench_sweeps(family: str, path: Path, naive_heads: int | None) -> dict:
    """Exact head sweep (shared prefix, batched) vs one patched forward per head; attribution."""
    hooked = HookedVLM.from_pretrained(path)
    source_image = Image.open(ASSETS / "chelsea.jpg")
    base_image = Image.open(ASSETS / "coffee.jpg").resize(source_image.size)
    base = hooked.prepare(base_image, PROMPT, answers=ANSWER[family])
    source = hooked.prepare(source_image, PROMPT, answers=ANSWER[family])
    metric = answer_nll_metric(base)
    positions = torch.arange(int(base.layout.position.max()) + 1, base.input_ids.shape[1])
    heads = [(l, h) for l in range(hooked.cfg.n_layers) for h in range(hooked.cfg.n_heads)]
    naive_subset = heads if naive_heads is None else heads[:: max(1, len(heads) // naive_heads)]

    fast_times = []  # the median of three: one sweep is ~5 forwards, short enough for noise to show
    for _ in range(3):
        start = time.perf_counter()
        fast = head_patching_sweep(hooked, base, source, metric, positions, batch_size=16)
        fast_times.append(time.perf_counter() - start)
    fast_s = statistics.median(fast_times)
    start = time.perf_counter()
    slow = naive_head_patching(hooked, base, source, metric, positions, heads=naive_subset)
    naive_s = (time.perf_counter() - start) * len(heads) / len(naive_subset)
    checked = ~torch.isnan(slow)
    with torch.no_grad():
        start = time.perf_counter()
        hooked(base)
        forward_s = time.perf_counter() - start
    start = time.perf_counter()
    head_attribution(hooked, base, source, metric, positions)
    attribution_s = time.perf_counter() - start
    return {
        "heads": len(heads),
        "patched_positions": len(positions),
        "sequence_length": base.input_ids.shape[1],
        "naive_heads_timed": len(naive_subset),
        "sweep_speedup_vs_naive": naive_s / fast_s,
        "sweep_max_abs_diff_vs_naive": (fast[checked] - slow[checked]).abs().max().item(),
        "attribution_ratio_vs_forward": attribution_s / forward_s,
    }


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, help="default: results.json, or results_quick.json with --quick")
    parser.add_argument("--caches-only", type=Path, help=argparse.SUPPRESS)  # the child of bench_caches_with_glibc_defaults
    args = parser.parse_args()
    if args.caches_only:
        print(json.dumps(bench_caches(args.caches_only, args.reps)))
        return
    size = "quick" if args.quick else "mid"
    # a smoke run must not overwrite the committed reference figures
    out = args.out or Path(__file__).parent / ("results_quick.json" if args.quick else "results.json")
    reps = args.reps or (3 if args.quick else 7)
    torch.manual_seed(0)
    results = {"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llava", "internvl"):
            path = build(family, size, Path(tmp))
            results[family] = bench_forward(family, path, reps)
            results[family] |= {f"sweep_{k}": v for k, v in bench_sweeps(family, path, None if family == "llava" else 8).items()}
            results[family] |= peak_memory_mb(family, str(path))
            results[family] |= bench_caches_with_glibc_defaults(path, reps)
            print(f"\n== {family}\n" + "\n".join(f"{k:40s} {_fmt(v)}" for k, v in results[family].items()), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + summary_table(results))


# (label, key, target: (comparison, bound) or None)
SUMMARY = [
    ("hooked forward / HF eager forward", "forward_ratio", ("<=", 1.05)),
    ("hooked forward, eager attention / HF eager", "forward_eager_ratio", None),
    ("run_with_cache, every hook / forward", "cache_all_ratio_vs_forward", ("<=", 1.5)),
    ("run_with_cache, every hook / HF eager forward", "cache_all_ratio_vs_hf", None),
    ("HF eager, all hidden states and attentions returned / HF eager", "hf_all_outputs_ratio_vs_hf", None),
    ("run_with_cache, filtered (LM resid_post) / forward", "cache_filtered_ratio_vs_forward", ("<=", 1.1)),
    ("run_with_cache, every hook / forward, glibc's malloc policy (opted out)", "glibc_defaults_cache_all_ratio_vs_forward", None),
    ("run_with_cache, filtered / forward, glibc's malloc policy (opted out)", "glibc_defaults_cache_filtered_ratio_vs_forward", None),
    ("generation speed, hooked / HF (>1: faster)", "generation_speed_ratio", None),
    ("exact head sweep: speedup over one forward per head", "sweep_sweep_speedup_vs_naive", (">=", 10)),
    ("exact head sweep: max abs MF diff vs naive", "sweep_sweep_max_abs_diff_vs_naive", None),
    ("attribution patching, all heads / forward", "sweep_attribution_ratio_vs_forward", ("<=", 4)),
    ("TransformerBridge forward / HF eager", "bridge_forward_ratio_vs_hf", None),
    ("TransformerBridge run_with_cache / HF eager", "bridge_cache_ratio_vs_hf", None),
    ("nnsight trace, no intervention / HF eager", "nnsight_trace_ratio_vs_hf", None),
    ("nnsight, every LM layer's output saved / HF eager", "nnsight_resid_ratio_vs_hf", None),
    ("nnsight tracer.cache(), every module's output / HF eager", "nnsight_cache_ratio_vs_hf", None),
    ("peak MB: HF eager forward", "peak_mb_hf_forward", None),
    ("peak MB: hooked forward", "peak_mb_hooked_forward", None),
    ("peak MB: hooked cache, every hook", "peak_mb_hooked_cache_all", None),
    ("peak MB: hooked cache, filtered", "peak_mb_hooked_cache_filtered", None),
    ("resident MB kept after the full cache is freed", "retained_mb_after_cache_freed", None),
    ("resident MB kept after release_freed_memory()", "retained_mb_after_release", None),
    ("cache size MB: every hook", "cache_all_mb", None),
    ("cache size MB: filtered", "cache_filtered_mb", None),
    ("HF all hidden states and attentions returned, MB", "hf_all_outputs_mb", None),
]


def summary_table(results: dict) -> str:
    """Both families side by side, as a Markdown table, with the targets of the issue."""
    families = [f for f in ("llava", "internvl") if f in results]
    shapes = " / ".join(f"{f}: {results[f]['sequence_length']} tokens, {results[f]['views']} view(s)" for f in families)
    lines = [f"{results['size']} models, {results['threads']} threads, torch {results['torch']}; {shapes}", ""]
    lines += ["| measure | target | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for label, key, target in SUMMARY:
        cells = []
        for family in families:
            value = results[family].get(key)
            if not isinstance(value, (int, float)):
                cells.append("n/a")
                continue
            ok = "" if target is None else (" ✓" if (value <= target[1] if target[0] == "<=" else value >= target[1]) else " ✗")
            cells.append(f"{_fmt(value)}{ok}")
        bound = "" if target is None else f"{target[0].replace('<=', '≤').replace('>=', '≥')} {target[1]}"
        lines.append(f"| {label} | {bound} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
