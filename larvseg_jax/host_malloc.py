"""Keeps freed host memory mapped on CPU-only runs, so XLA:CPU does not page-fault every step.

XLA:CPU mallocs each execution's temporary buffers (2.7 GiB for a B/16 train step of 4 images)
from its worker threads. glibc serves such sizes with mmap in per-thread arenas and gives them
back with munmap (or trims the heap), so every step faults all of it in again: about 740k page
faults and 3-5 s of system time per 14 s B/16 step on this project's CPU, up to 17 s right after
another program (PyTorch, a data loader) freed memory. One arena, no mmap and no trimming keep
freed blocks in the heap for the next step: no faults, and the process keeps its peak RSS (the
usual trade of a caching allocator). B/16 step with PyTorch steps in between: 17-27 -> 13.4-14.1 s.
The reuse is partial in a small test (some calls fault a whole fresh block: a small allocation
left in a large freed block makes the heap grow), but not in the B/16 step: over 20 steps
(`benchmarks/malloc_growth.py`) RSS stayed flat at 5.84 GiB (glibc's default: 4.29 GiB, the
price of keeping the peak), 0 faults, 11.6 against 12.5 s per step.
Still opt-in (`LARVSEG_MALLOC=keep`): one arena means one malloc lock for every thread of the
process, the input pipeline's included. For the small variants (tiny, micro: step temporaries of
a few MiB) that lock costs far more than the faults (synthetic tiny run 286 -> 71 img/s), so they
never get it; a full B/16 run with its data pipeline has not been measured with it. Linux/glibc
only.
Accelerator runs are left alone: their step buffers live on the device.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import platform

from absl import logging

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
SMALL_VARIANTS = ("tiny", "micro")  # models/vit.py VARIANTS whose steps need a few MiB


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is
    installed. Decided without starting a backend (that would create XLA's threads first)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return set(platforms.lower().split(",")) <= {"cpu"}
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory(variant: str) -> bool:
    """With LARVSEG_MALLOC=keep, sets glibc's malloc to one arena, no mmap, no trim for a CPU run
    of a real-size ViT `variant`; True where it did.

    Call it before JAX starts its backend: threads that malloc'ed before keep their own arenas.
    """
    if variant in SMALL_VARIANTS or os.environ.get("LARVSEG_MALLOC", "") != "keep":
        return False
    if not cpu_only():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # mallopt takes an int: -1 as the trim threshold is SIZE_MAX (never trim) inside glibc.
    done = all(
        libc.mallopt(param, value)
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )
    if done:
        logging.info(
            "Host malloc keeps freed memory (one arena, no mmap, no trim) so XLA:CPU's step "
            "buffers are not page-faulted again every step (LARVSEG_MALLOC=keep)"
        )
    return done
