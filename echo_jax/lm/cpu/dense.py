"""The model's dense layers with backward passes written for XLA:CPU's matmul library.

Why: jax differentiates `y = x @ w` into a weight gradient `x^T @ g` that contracts both
operands' token dimension. XLA:CPU hands YNNPACK only dots that contract the left operand's
minor dimension; this one it ran through Eigen, ~30 % slower and in a lump no other op overlapped
(benchmarks/RESULTS.md, session 6). Here the backward passes transpose the activations
explicitly, behind `optimization_barrier` so that XLA cannot fold the transpose back into the
dot, and every weight gradient is a row-major matmul. The SwiGLU MLP saves its gate and up
pre-activations and its output h, and its backward recomputes the gate's sigmoid (optionally in
swiglu.py's C++ kernel) rather than saving it. The values and gradients are those of the plain
expressions (up to float rounding); ops.py uses them on one CPU device (op "dense_vjps").

Reverse mode only (`jax.custom_vjp`): no `jax.jvp` through them.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from echo_jax.lm.cpu import swiglu as cpu_swiglu


def _transposed(x_NxD: jax.Array) -> jax.Array:
    """x^T as its own array: the barrier keeps XLA from folding the transpose into a dot."""
    return lax.optimization_barrier(x_NxD.T)


@jax.custom_vjp
def project(x_NxD: jax.Array, ws_DxF: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """`x @ w` for each `w` (e.g. q, k and v); the backward transposes `x` once for all."""
    return tuple(x_NxD @ w for w in ws_DxF)


def _project_fwd(x_NxD, ws_DxF):
    return project(x_NxD, ws_DxF), (x_NxD, ws_DxF)


def _project_bwd(residuals, gs_NxF):
    x_NxD, ws_DxF = residuals
    xt_DxN = _transposed(x_NxD)
    dx_NxD = sum(g @ w.T for g, w in zip(gs_NxF, ws_DxF))
    return dx_NxD, tuple(xt_DxN @ g for g in gs_NxF)


project.defvjp(_project_fwd, _project_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def swiglu(
    x_NxD: jax.Array,
    w_gate_DxF: jax.Array,
    w_up_DxF: jax.Array,
    w_out_FxD: jax.Array,
    kernel: bool = False,
) -> jax.Array:
    """`(silu(x @ w_gate) * (x @ w_up)) @ w_out`; `kernel`: the elementwise part through
    swiglu.py's C++ kernel (float32, CPU, after `build.require()`)."""
    return _swiglu_fwd(x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD, kernel)[0]


def _swiglu_fwd(x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD, kernel):
    gate_NxF, up_NxF = x_NxD @ w_gate_DxF, x_NxD @ w_up_DxF
    if kernel:
        h_NxF = cpu_swiglu.silu_mul(gate_NxF, up_NxF)
    else:
        h_NxF = gate_NxF * jax.nn.sigmoid(gate_NxF) * up_NxF
    return h_NxF @ w_out_FxD, (x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD, gate_NxF, up_NxF, h_NxF)


def _swiglu_bwd(kernel, residuals, dy_NxD):
    x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD, gate_NxF, up_NxF, h_NxF = residuals
    dh_NxF = dy_NxD @ w_out_FxD.T
    # (dy^T h)^T: the transpose of the small [D, F] result is cheaper than that of h.
    dw_out_FxD = lax.optimization_barrier(_transposed(dy_NxD) @ h_NxF).T
    if kernel:
        dgate_NxF, dup_NxF = cpu_swiglu.silu_mul_grads(dh_NxF, gate_NxF, up_NxF)
    else:
        sig_NxF = jax.nn.sigmoid(gate_NxF)
        dup_NxF = dh_NxF * gate_NxF * sig_NxF
        dgate_NxF = dh_NxF * up_NxF * sig_NxF * (1.0 + gate_NxF * (1.0 - sig_NxF))
    xt_DxN = _transposed(x_NxD)
    dx_NxD = dgate_NxF @ w_gate_DxF.T + dup_NxF @ w_up_DxF.T
    return dx_NxD, xt_DxN @ dgate_NxF, xt_DxN @ dup_NxF, dw_out_FxD


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
