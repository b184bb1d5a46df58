"""`keep_freed_memory` makes a freed large block serve the next allocation without page faults,
and `release_freed_memory` hands it back to the kernel. Each case runs in a fresh
interpreter: malloc's policy is process-wide and must not leak into the rest of the suite."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PROGRAM = """
import json, resource
import torch
from hooked_vlm.allocator import keep_freed_memory, release_freed_memory

def faults(n=2**24):  # page faults of allocating, filling and freeing n floats (64 MB by default)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def median_of_later(n=2**24):  # after a first call; a median, for the heap's layout can make
    faults(n)                  # one call in several land beside the freed block, not in it
    return sorted(faults(n) for _ in range(5))[2]

result = {"default": median_of_later()}
result["kept"] = keep_freed_memory() and median_of_later()
result["released"] = release_freed_memory() and faults()
result["restored"] = keep_freed_memory(False)  # the policy; blocks in malloc's bins stay there
print(json.dumps(result))
"""


def test_keep_freed_memory_reuses_freed_blocks_until_released():
    env = os.environ | {"THP_MEM_ALLOC_ENABLE": "0"}  # 4 KiB pages, whatever the caller's environment
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, env=env)
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 2**26 // 4096  # 64 MB in 4 KiB pages: what a fresh block costs
    assert faults["default"] > pages // 2, faults
    assert faults["kept"] < pages // 20, faults
    assert faults["released"] > pages // 2, faults
    assert faults["restored"] is True, faults
