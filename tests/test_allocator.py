"""`keep_freed_memory` makes a freed large block serve the next allocation without page faults,
and `release_freed_memory` hands it back to the kernel; `run_with_cache` and eager attention on CPU
turn it on by default unless the user opted out. Each case runs in a fresh interpreter: malloc's policy is
process-wide and must not leak into the rest of the suite."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

FAULTS = """
import json, resource
import torch

def faults(n=2**24):  # page faults of allocating, filling and freeing n floats (64 MB by default)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def median_of_later(n=2**24):  # after a first call; a median, for the heap's layout can make
    faults(n)                  # one call in several land beside the freed block, not in it
    return sorted(faults(n) for _ in range(5))[2]
"""

PROGRAM = FAULTS + """
from hooked_vlm.allocator import keep_freed_memory, release_freed_memory

result = {"default": median_of_later()}
result["kept"] = keep_freed_memory() and median_of_later()
result["released"] = release_freed_memory() and faults()
result["restored"] = keep_freed_memory(False)  # the policy; blocks in malloc's bins stay there
print(json.dumps(result))
"""


CACHE_PROGRAM = FAULTS + """
import sys
from PIL import Image
from hooked_vlm import HookedVLM, keep_freed_memory

if sys.argv[1] == "opt-out-call":
    keep_freed_memory(False)
model = HookedVLM.from_pretrained("toy-llava")
inputs = model.prepare(Image.new("RGB", (96, 64), "white"), "Is there a red circle?")
result = {"before": median_of_later()}
model(inputs)  # a forward alone changes nothing
result["after_forward"] = median_of_later()
if sys.argv[2] == "cache":
    model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_post")
else:  # a knockout-style forward: a hook on the scores materialises every pattern
    model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda scores, hook: None)])
result["after_cache"] = median_of_later()
print(json.dumps(result))
"""


def _run(program: str, *args: str, opt_out: bool = False) -> dict:
    """`program`'s last line of output; 4 KiB pages and the default policy, whatever the caller's
    environment, unless `opt_out`."""
    env = {key: value for key, value in os.environ.items() if key != "HOOKED_VLM_KEEP_FREED_MEMORY"}
    env |= {"THP_MEM_ALLOC_ENABLE": "0"} | ({"HOOKED_VLM_KEEP_FREED_MEMORY": "0"} if opt_out else {})
    done = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_reuses_freed_blocks_until_released():
    faults = _run(PROGRAM)
    pages = 2**26 // 4096  # 64 MB in 4 KiB pages: what a fresh block costs
    assert faults["default"] > pages // 2, faults
    assert faults["kept"] < pages // 20, faults
    assert faults["released"] > pages // 2, faults
    assert faults["restored"] is True, faults


@pytest.mark.parametrize("trigger", ["cache", "eager attention"])
@pytest.mark.parametrize("case", ["default", "opt-out-variable", "opt-out-call"])
def test_caches_and_eager_attention_keep_freed_memory_unless_opted_out(case, trigger):
    """The first CPU cache, or the first forward that materialises attention patterns (a hook on
    the scores or pattern: knockout), switches the policy on; a plain forward does not."""
    faults = _run(CACHE_PROGRAM, case, "cache" if trigger == "cache" else "eager", opt_out=case == "opt-out-variable")
    pages = 2**26 // 4096
    assert faults["before"] > pages // 2, faults
    assert faults["after_forward"] > pages // 2, faults
    if case == "default":
        assert faults["after_cache"] < pages // 20, faults
    else:
        assert faults["after_cache"] > pages // 2, faults
