"""RMSNorm as one CPU kernel per pass (`kernels/rms_norm.cc`), as a JAX function.

XLA:CPU runs the model's RMSNorm as four or five small ops per pass, each paying a dispatch and a
trip through memory; the kernel does a pass in one op (a tiny train step ~105 -> ~100 ms,
benchmarks/RESULTS.md). build.py builds and registers it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LANES = 16  # the normalised dim must be a multiple of the kernel's vector width


def supports(x: jax.Array) -> bool:
    """Shapes and dtype the kernel handles: float32, last dim a positive multiple of `LANES`."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and x.shape[-1] > 0 and x.shape[-1] % LANES == 0


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2, -1) + eps) * scale` in float32. Reverse-mode differentiable. Call
    `build.require()` first."""
    return _rms_norm(x, scale.astype(jnp.float32), eps)


def _forward_call(x, scale, eps):
    return jax.ffi.ffi_call(
        "echo_rms_norm_fwd",
        (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32),
        ),
        vmap_method="sequential",
    )(x, scale, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, scale, eps):
    return _forward_call(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    y, rstd = _forward_call(x, scale, eps)
    return y, (x, scale, rstd)


def _rms_norm_bwd(eps, residuals, dy):
    del eps  # the saved rstd holds it
    x, scale, rstd = residuals
    return jax.ffi.ffi_call(
        "echo_rms_norm_bwd",
        (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(scale.shape, jnp.float32),
        ),
        vmap_method="sequential",
    )(x, scale, rstd, dy)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
