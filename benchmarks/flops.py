"""The machine's measured matmul peak: with `echo_jax.lm.pretrain.flops_per_token` it gives
model FLOP utilisation (MFU) on hosts with no published peak, such as CPUs."""

from __future__ import annotations

import time

import numpy as np


def matmul_peak_gflops(n: int = 2048, dtype: type = np.float32, repeats: int = 5) -> float:
    """Best sustained GFLOP/s of an n x n matmul, over NumPy and (if installed) PyTorch.

    Best of `repeats` timings, as a peak should be: slower runs measure other load on the host.
    """
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(dtype)
    matmuls = [lambda: a @ b]
    try:
        import torch
    except ImportError:
        pass
    else:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        matmuls.append(lambda: ta @ tb)
    best_s = float("inf")
    for matmul in matmuls:
        matmul()  # warm up threads and caches
        for _ in range(repeats):
            start = time.perf_counter()
            matmul()
            best_s = min(best_s, time.perf_counter() - start)
    return 2 * n**3 / best_s / 1e9

