"""The machine's measured matmul peak: with `echo_jax.lm.pretrain.flops_per_token` it gives
model FLOP utilisation (MFU) on hosts with no published peak, such as CPUs."""

from __future__ import annotations

import time

import numpy as np


def matmul_rates_gflops(n: int = 2048, repeats: int = 20) -> dict[str, float]:
    """Best sustained f32 GFLOP/s of an n x n matmul per implementation: NumPy, PyTorch (if
    installed) and XLA (jax.jit). Best of `repeats` timings, as a peak should be: slower runs
    measure other load on the host. On the 2-core dev machine XLA's kernels reach about twice
    NumPy's and PyTorch's rate (benchmarks/RESULTS.md), so a peak without XLA flatters MFU."""
    import jax
    import jax.numpy as jnp

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    xla_matmul = jax.jit(lambda x, y: x @ y)
    matmuls = {"numpy": lambda: a @ b, "xla": lambda: xla_matmul(xa, xb).block_until_ready()}
    try:
        import torch
    except ImportError:
        pass
    else:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        matmuls["torch"] = lambda: ta @ tb
    rates = {}
    for name, matmul in matmuls.items():
        matmul()  # warm up threads, caches and the compile
        best_s = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul()
            best_s = min(best_s, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best_s / 1e9
    return rates


def matmul_peak_gflops(n: int = 2048, repeats: int = 20) -> float:
    """The best rate of `matmul_rates_gflops`: the peak MFU is measured against."""
    return max(matmul_rates_gflops(n, repeats).values())
