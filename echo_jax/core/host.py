"""Host memory allocator settings that XLA:CPU needs to run at full speed on Linux.

XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a train step) with
`posix_memalign` from one of its worker threads. glibc serves a request that large from that
thread's arena with a fresh `mmap` and unmaps it on free, so every step page-faults the whole
buffer in again: on the 2-core CI machine the tiny pretraining step took 115k minor faults and
spent ~40 % of its CPU time in the kernel (benchmarks/RESULTS.md). One arena that never
returns memory to the OS and never mmaps keeps the buffer mapped from step to step.

`echo_jax/__init__.py` applies this on import; it must run before any thread allocates
(import echo_jax before jax runs anything). Set ECHO_JAX_TUNE_MALLOC=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_malloc() -> bool:
    """Single arena, no mmap-backed chunks, no trimming. Returns whether it was applied
    (only on Linux with glibc, and unless ECHO_JAX_TUNE_MALLOC=0)."""
    if os.environ.get("ECHO_JAX_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A trim threshold of -1 converts to SIZE_MAX inside glibc: never trim the heap top.
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
