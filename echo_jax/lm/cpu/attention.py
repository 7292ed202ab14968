"""The fused CPU attention kernel (`kernels/attention.cc`) as a JAX function.

XLA:CPU runs training attention as separate ops that stream [Q, S] tensors through memory, at a
fraction of its matmul rate for head dims of 32 (benchmarks/RESULTS.md). The kernel is an XLA
FFI custom call: one task per (row, head) on XLA's own thread pool, only the keys each query
can see (its own packed example, up to itself), the probabilities recomputed in the backward
pass from the saved log-sum-exp as flash attention does. build.py builds and registers it.
Shape legend: B batch, L length, H heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HEAD_DIMS = (32, 64, 128)


def supports(q_BxLxHxK: jax.Array) -> bool:
    """Shapes and dtype the kernel handles: float32 and a head dim in `HEAD_DIMS`."""
    return q_BxLxHxK.dtype == jnp.float32 and q_BxLxHxK.shape[-1] in HEAD_DIMS


def attention(
    q_BxLxHxK: jax.Array,
    k_BxLxHxK: jax.Array,
    v_BxLxHxK: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    rope_cos_PxK2: jax.Array,
    rope_sin_PxK2: jax.Array,
    smear_gate_H: jax.Array,
) -> jax.Array:
    """lm/attention.py's `self_attention` from the raw projections: keys smeared by
    `smear_gate_H` (zeros: none), queries and keys rotated by RoPE (tables indexed by position,
    as `attention.rope_tables`), then `attention_mask`'s semantics; a query that sees no key
    (padding) outputs zeros. Positions must index the tables. Reverse-mode differentiable (not in
    the tables). Call `build.require()` first."""
    return _attention(
        q_BxLxHxK,
        k_BxLxHxK,
        v_BxLxHxK,
        positions_BxL.astype(jnp.int32),
        segment_ids_BxL.astype(jnp.int32),
        rope_cos_PxK2,
        rope_sin_PxK2,
        smear_gate_H.astype(jnp.float32),
    )


def _forward_call(*operands):
    q = operands[0]
    B, L, H, _ = q.shape
    return jax.ffi.ffi_call(
        "echo_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, L), jnp.float32)),
        vmap_method="sequential",
    )(*operands)


@jax.custom_vjp
def _attention(q, k, v, positions, segments, rope_cos, rope_sin, gate):
    return _forward_call(q, k, v, positions, segments, rope_cos, rope_sin, gate)[0]


def _attention_fwd(*operands):
    out, lse = _forward_call(*operands)
    return out, (operands, out, lse)


def _attention_bwd(residuals, dout):
    operands, out, lse = residuals
    q, gate = operands[0], operands[-1]
    grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    dq, dk, dv, dgate_BxH = jax.ffi.ffi_call(
        "echo_attention_bwd",
        (grad, grad, grad, jax.ShapeDtypeStruct((q.shape[0], gate.shape[0]), jnp.float32)),
        vmap_method="sequential",
    )(*operands, out, lse, dout)
    return dq, dk, dv, None, None, None, None, dgate_BxH.sum(0)


_attention.defvjp(_attention_fwd, _attention_bwd)
