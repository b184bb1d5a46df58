"""Keep freed CPU memory in the process, as PyTorch's caching allocator does on CUDA.

glibc's malloc serves large blocks (attention patterns, MLP activations) with fresh `mmap`s and
returns them to the kernel as soon as they are freed. A forward frees each one after use; a full
`run_with_cache` keeps them all, so every call page-faults its whole cache in anew and the kernel
zeroes every page: on a 4.8 GB InternVL cache that alone makes the call 2.6-3.8x the forward
(`benchmarks/README.md`). `keep_freed_memory()` tells malloc to take large blocks from its heap
and never to trim it, so the next call reuses the memory the last one freed; the process keeps
its peak resident size until `release_freed_memory()` hands the free part back (the CPU analogue
of `torch.cuda.empty_cache()`).

Off by default, because it changes malloc's policy for the whole process. glibc (Linux) only;
elsewhere both functions warn and do nothing. On CUDA they are not needed. (PyTorch's own
`THP_MEM_ALLOC_ENABLE=1`, huge pages for tensors of 2 MB and more, is no substitute: it cut a
fresh process's InternVL cache from 3.4x to 2.2x the forward, but in a process that had run
other models it took 3.6x against 2.6x without, as the kernel compacts memory to find them.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
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

    `enabled=False` restores glibc's default thresholds (without their dynamic adjustment) for
    what is freed from then on; blocks malloc already holds stay until `release_freed_memory()`.

    Returns whether the setting took effect. With it, a full `run_with_cache` costs about the
    forward plus the hooks (1.08-1.15x / 1.17-1.24x for the mid-size LLaVA / InternVL
    benchmarks, against 1.49-1.68x / 2.6-3.8x without). Memory is not leaked: freed blocks serve
    later allocations of any size, and `release_freed_memory()` returns them to the system."""
    libc = _require_glibc("keep_freed_memory")
    if libc is None:
        return False
    if enabled:
        # A threshold of -1 is SIZE_MAX for glibc: "disables trimming completely" (mallopt(3)).
        settings = [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
    else:
        settings = [
            (M_MMAP_MAX, DEFAULT_MMAP_MAX),
            (M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
        ]
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> bool:
    """Return the process's free heap memory to the system (`malloc_trim(0)`); whether any was."""
    libc = _require_glibc("release_freed_memory")
    return bool(libc.malloc_trim(0)) if libc is not None else False
