"""Peak memory of one run, above the memory the loaded model already holds.

Each measurement runs in a fresh process (so runs cannot inherit each other's allocator state);
a thread samples the anonymous resident memory every millisecond while the run executes, and the
peak minus the value just before the run is reported. CPU only (on CUDA use torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

MODES = ("hf_forward", "hooked_forward", "hooked_cache_all", "hooked_cache_filtered", "hf_load", "hooked_load")


def _rss_mb() -> float:
    """Anonymous resident memory (RssAnon): what the process itself allocated. File-backed pages
    of memory-mapped checkpoints are left out: they are the file, shared and reclaimable, not a copy."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _measure(fn) -> float:
    peak, done = [_rss_mb()], threading.Event()
    baseline = peak[0]

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_mb()) - baseline


def _child(family: str, path: str, mode: str) -> None:
    import gc

    import torch
    from PIL import Image

    from hooked_vlm import HookedVLM, release_freed_memory

    torch.set_grad_enabled(False)
    if mode.endswith("_load"):  # loading: peak memory over the weights themselves
        _load(family, path, mode)
        return
    hooked = HookedVLM.from_pretrained(path)
    image = Image.open(__file__.rsplit("/", 2)[0] + "/tests/assets/chelsea.jpg")
    inputs = hooked.prepare(image, "Please provide the bounding box coordinates of the cat.")
    resid_only = lambda name: name.endswith("hook_resid_post") and not name.startswith("vision.")  # noqa: E731
    if mode == "hf_forward":
        from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

        cls = LlavaForConditionalGeneration if family == "llava" else InternVLForConditionalGeneration
        reference = cls.from_pretrained(path, attn_implementation="eager").eval()
        del hooked
        kwargs = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
        run = lambda: reference(**kwargs)  # noqa: E731
    elif mode == "hooked_forward":
        run = lambda: hooked(inputs)  # noqa: E731
    elif mode == "hooked_cache_all":
        run = lambda: hooked.run_with_cache(inputs)  # noqa: E731
    else:
        run = lambda: hooked.run_with_cache(inputs, names_filter=resid_only)  # noqa: E731
    gc.collect()
    baseline = _rss_mb()
    result = {mode: _measure(run)}
    if mode == "hooked_cache_all":  # what the process holds once the cache is freed, then released
        gc.collect()
        result["retained_mb_after_cache_freed"] = _rss_mb() - baseline
        release_freed_memory()
        result["retained_mb_after_release"] = _rss_mb() - baseline
    print(json.dumps(result))


def _load(family: str, path: str, mode: str) -> None:
    """Peak RSS while loading, as a multiple of the loaded model's parameter bytes (1.0 = the
    weights are read into place with no second copy)."""
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    from hooked_vlm import HookedVLM

    holder = {}
    if mode == "hooked_load":
        load = lambda: holder.setdefault("model", HookedVLM.from_pretrained(path))  # noqa: E731
    else:
        cls = LlavaForConditionalGeneration if family == "llava" else InternVLForConditionalGeneration
        load = lambda: holder.setdefault("model", cls.from_pretrained(path))  # noqa: E731
    peak = _measure(load)
    weights = sum(p.numel() * p.element_size() for p in holder["model"].parameters()) / 2**20
    print(json.dumps({f"{mode}_peak_over_weights": peak / weights, f"{mode}_weights_mb": weights}))


def peak_memory_mb(family: str, path: str) -> dict[str, float]:
    """{"peak_mb_<mode>": MB above the loaded model} for every mode, each in its own process."""
    out = {}
    for mode in MODES:
        result = subprocess.run([sys.executable, __file__, family, path, mode], capture_output=True, text=True, check=True)
        values = json.loads(result.stdout.strip().splitlines()[-1])
        out.update({(k if k.endswith(("_over_weights", "_weights_mb")) or k.startswith("retained_") else f"peak_mb_{k}"): v for k, v in values.items()})
    return out


if __name__ == "__main__":
    _child(*sys.argv[1:4])
