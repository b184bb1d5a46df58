"""Keep freed CPU memory in the process, as PyTorch's caching allocator does on CUDA.

glibc's malloc serves large blocks (attention patterns, MLP activations) with fresh `mmap`s and
returns them to the kernel as soon as they are freed. A forward frees each one after use; a full
`run_with_cache` keeps them all, so every call page-faults its whole cache in anew and the kernel
zeroes every page: on a 4.8 GB InternVL cache that alone makes the call 2.5-3.8x the forward
(`benchmarks/README.md`). `keep_freed_memory()` tells malloc to take large blocks from its heap
and never to trim it, so the next call reuses the memory the last one freed; the process keeps
its peak resident size until `release_freed_memory()` hands the free part back (the CPU analogue
of `torch.cuda.empty_cache()`).

`HookedVLM.run_with_cache` turns this on by itself the first time it caches into CPU memory, and
so does attention the first time it materialises patterns on CPU (knockout, a pattern hook,
eager mode), unless the user chose first (`keep_freed_memory(False)`) or the environment says
`HOOKED_VLM_KEEP_FREED_MEMORY=0`: those are the places where the library itself creates large
short-lived tensors call after call (a mid-size InternVL eager forward: 2.2-2.3 s without, 1.5 s
with). glibc (Linux) only; elsewhere the default does
nothing and the explicit calls warn. On CUDA none of this is needed. (PyTorch's own
`THP_MEM_ALLOC_ENABLE=1`, huge pages for tensors of 2 MB and more, is no substitute: in a fresh
process it cut the InternVL cache from 3.4x to 2.2x the forward in one trial and alternated
between 1.2x and 2.5x from call to call in another; in a process that had run other models it
took 3.6x against 2.6x without, as the kernel compacts memory to find them.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings
from functools import cache

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's defaults (mallopt cannot read them back): 128 KiB thresholds, 65536 mmapped blocks
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
OPT_OUT_VARIABLE = "HOOKED_VLM_KEEP_FREED_MEMORY"

_choice: bool | None = None  # set by an explicit call, or when the default is decided
_kept = False  # whether malloc currently runs with the keeping policy


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    path = ctypes.util.find_library("c")
    return ctypes.CDLL(path) if path else None


def _require_glibc(what: str) -> ctypes.CDLL | None:
    libc = _glibc()
    if libc is None:
        warnings.warn(f"{what} needs glibc's malloc (Linux); on {platform.system()} it does nothing", stacklevel=3)
    return libc


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make freed CPU memory stay in the process for reuse.

    `enabled=False` opts out of the default (see the module docstring); if the policy was on, it restores
    glibc's default thresholds (without their dynamic adjustment) for what is freed from then on,
    and blocks malloc already holds stay until `release_freed_memory()`.

    Returns whether the setting took effect. With it, a full `run_with_cache` costs about the
    forward plus the hooks (1.10-1.15x / 1.22-1.26x for the mid-size LLaVA / InternVL benchmarks,
    against 1.49-2.61x / 2.5-3.8x without); eager-attention forwards (knockout) 1.5x. Memory
    is not leaked: freed blocks serve later allocations of any size, and `release_freed_memory()`
    returns them to the system."""
    global _choice
    _choice = enabled
    libc = _require_glibc("keep_freed_memory")
    if libc is None:
        return False
    if not enabled and not _kept:
        return True  # glibc's own policy, dynamic thresholds included, was never changed
    return _set_policy(libc, enabled)


def keep_freed_memory_by_default() -> None:
    """The policy `run_with_cache` and eager attention apply once, before their first CPU cache or
    pattern: keep freed memory, unless the user already chose or set
    `HOOKED_VLM_KEEP_FREED_MEMORY=0`."""
    global _choice
    if _choice is not None:
        return
    _choice = os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")
    libc = _glibc()
    if _choice and libc is not None:
        _set_policy(libc, True)


def _set_policy(libc: ctypes.CDLL, enabled: bool) -> bool:
    global _kept
    if enabled:
        # A threshold of -1 is SIZE_MAX for glibc: "disables trimming completely" (mallopt(3)).
        settings = [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
    else:
        settings = [
            (M_MMAP_MAX, DEFAULT_MMAP_MAX),
            (M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
        ]
    done = all(libc.mallopt(param, value) == 1 for param, value in settings)
    _kept = enabled and done
    return done


def release_freed_memory() -> bool:
    """Return the process's free heap memory to the system (`malloc_trim(0)`); whether any was."""
    libc = _require_glibc("release_freed_memory")
    return bool(libc.malloc_trim(0)) if libc is not None else False
