"""Host memory allocator settings that XLA:CPU needs to run at full speed on Linux.

XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a train step) with
`posix_memalign` from one of its worker threads. glibc serves a request that large from that
thread's arena with a fresh `mmap` and unmaps it on free, so every step page-faults the whole
buffer in again: on our 2-core dev machine the tiny pretraining step took 115k minor faults and
spent ~40 % of its CPU time in the kernel (benchmarks/RESULTS.md). One arena that never
returns memory to the OS and never mmaps keeps the buffer mapped from step to step.

`echo_jax/__init__.py` applies this on import; it must run before XLA's threads allocate
(import echo_jax before jax runs anything; later, it warns and changes nothing). Hosts with a
TPU or GPU are left alone: one arena would serialise their host allocations for no gain. Set
ECHO_JAX_TUNE_MALLOC=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _backends_started() -> bool:
    """Whether jax already started its backends: XLA's threads then own their arenas."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge and xla_bridge.backends_are_initialized())


def _has_accelerator() -> bool:
    """TPU or NVIDIA devices (or JAX_PLATFORMS without cpu): XLA:CPU does not run the steps."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/nvidia[0-9]*"))


def tune_malloc() -> bool:
    """Single arena, no mmap-backed chunks, no trimming. Returns whether it took effect: only on
    Linux with glibc, without an accelerator, before jax started its backends, and unless
    ECHO_JAX_TUNE_MALLOC=0."""
    if (
        os.environ.get("ECHO_JAX_TUNE_MALLOC", "1") == "0"
        or not sys.platform.startswith("linux")
        or _has_accelerator()
    ):
        return False
    if _backends_started():
        warnings.warn(
            "echo_jax was imported after jax started its backends, too late to keep "
            "XLA:CPU from page-faulting its temporaries on every step (~1.4x slower "
            "training on CPU): import echo_jax before jax runs anything",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except AttributeError:  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A trim threshold of -1 converts to SIZE_MAX inside glibc: never trim the heap top.
    return all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )
