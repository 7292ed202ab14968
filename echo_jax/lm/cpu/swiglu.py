"""SwiGLU's elementwise part as one C++ kernel per pass (`kernels/swiglu.cc`).

Used inside dense.py's `swiglu` (its forward and its backward pass) where ops.py picks it:
XLA:CPU made four passes over the [N, F] activations (the sigmoid materialised, then one pass per
output); the kernel makes one forward and one backward pass. build.py builds and registers it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up` (float32). Not differentiable by itself: dense.py's VJP calls
    `silu_mul_grads`."""
    return jax.ffi.ffi_call(
        "echo_swiglu_fwd",
        jax.ShapeDtypeStruct(gate.shape, jnp.float32),
        vmap_method="broadcast_all",
    )(gate, up)


def silu_mul_grads(dh: jax.Array, gate: jax.Array, up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients of `silu_mul` for the cotangent `dh`: `(dgate, dup)`."""
    grad = jax.ShapeDtypeStruct(gate.shape, jnp.float32)
    return jax.ffi.ffi_call("echo_swiglu_bwd", (grad, grad), vmap_method="broadcast_all")(
        dh, gate, up
    )
