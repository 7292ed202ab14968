"""RMSNorm as one CPU kernel per pass (`kernels/cpu_rms_norm.cc`), as a JAX function.

XLA:CPU runs the model's RMSNorm as four or five small ops per pass, each paying a dispatch and a
trip through memory; the kernel does a pass in one op (a tiny train step ~105 -> ~100 ms,
benchmarks/RESULTS.md). lm/cpu_kernels.py builds and registers it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 16  # the normalised dim must be a multiple of the kernel's vector width


def supports(x: jax.Array) -> bool:
    """Shapes and dtype the kernel handles: float32, last dim a positive multiple of `LANES`."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and x.shape[-1] > 0 and x.shape[-1] % LANES == 0


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * rsqrt(mean(x^2, -1) + 1e-6) * scale` (lm/model.py `Norm`, kind "rms").
    Reverse-mode differentiable. Call `cpu_kernels.require()` first."""
    return _rms_norm(x, scale.astype(jnp.float32))


def _forward_call(x, scale):
    return jax.ffi.ffi_call("echo_rms_norm_fwd", (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)), vmap_method="sequential")(x, scale)


@jax.custom_vjp
def _rms_norm(x, scale):
    return _forward_call(x, scale)[0]


def _rms_norm_fwd(x, scale):
    y, rstd = _forward_call(x, scale)
    return y, (x, scale, rstd)


def _rms_norm_bwd(residuals, dy):
    x, scale, rstd = residuals
    return jax.ffi.ffi_call("echo_rms_norm_bwd", (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32)), vmap_method="sequential")(
            x, scale, rstd, dy)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
