"""The model's compute ops, each through XLA or, for a one-device CPU step, its CPU path.

lm/model.py calls one function per op; this module alone decides how it runs. The ops and
their CPU paths:

- `attention` (`attention`): training attention in one C++ kernel (attention.py);
- `rms_norm` (`rms_norm`): RMSNorm with its learned scale in one C++ kernel per pass;
- `dense_vjps` (`project_qkv`, `swiglu_mlp`): the q/k/v projections' and the MLP's backward
  passes laid out for XLA:CPU's matmuls (dense.py's custom VJPs);
- `swiglu` (`swiglu_mlp`): SwiGLU's elementwise part in one C++ kernel per pass, inside the
  `dense_vjps` VJPs (so only where those run).

`ModelConfig.kernels` sets every op: "auto" takes the CPU path where the step runs on one CPU
device, the op's shapes and dtype suit it and the C++ kernels load (else XLA, as on TPU, GPU and
multi-device meshes); "xla" never. `ModelConfig.kernel_overrides`, (op, choice) pairs, sets single
ops, with "cpu" as a third choice: the CPU path always, a one-line error where it cannot run.
Either way the values and gradients are the same up to float rounding, reverse-mode only (no
`jax.jvp` through the model), and not recorded in checkpoints (`model.config_meta`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from absl import logging

from echo_jax.core.config import ConfigError
from echo_jax.lm import attention as xla_attention
from echo_jax.lm.cpu import attention as cpu_attention
from echo_jax.lm.cpu import build, dense
from echo_jax.lm.cpu import rms_norm as cpu_rms_norm

if TYPE_CHECKING:
    from echo_jax.lm.model import ModelConfig

OPS = ("attention", "rms_norm", "dense_vjps", "swiglu")
NATIVE_OPS = ("attention", "rms_norm", "swiglu")  # C++ kernels, built by build.py
CHOICES = ("auto", "cpu", "xla")
# The default `ModelConfig.norm_eps`, for XLA and (as an FFI attribute) the C++ kernel alike.
NORM_EPS = 1e-6


def check_choices(kernels: str, overrides: Sequence) -> None:
    """Raises ValueError for a `kernels` / `kernel_overrides` value that names no op or choice,
    or that asks for the SwiGLU kernel where its host, the dense VJPs, does not run."""
    if kernels not in ("auto", "xla"):
        raise ConfigError(f"kernels must be 'auto' or 'xla', got {kernels!r}")
    for pair in overrides:
        if not (
            isinstance(pair, tuple) and len(pair) == 2 and pair[0] in OPS and pair[1] in CHOICES
        ):
            raise ConfigError(
                f"kernel_overrides holds (op, choice) pairs, op one of {OPS} and "
                f"choice one of {CHOICES}; got {pair!r}"
            )
    chosen = dict(overrides)
    if chosen.get("swiglu", kernels) == "cpu" and chosen.get("dense_vjps", kernels) == "xla":
        raise ConfigError(
            "swiglu='cpu' runs inside the dense_vjps custom VJPs: set dense_vjps "
            "to 'auto' or 'cpu', or swiglu to 'auto' or 'xla'"
        )


def choice(cfg: ModelConfig, op: str) -> str:
    """ "auto", "cpu" or "xla": `op`'s entry in `cfg.kernel_overrides`, else `cfg.kernels`."""
    return dict(cfg.kernel_overrides).get(op, cfg.kernels)


def one_cpu_device(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> bool:
    """Whether a step runs on a single CPU device: `mesh`'s (default: the mesh being traced
    under), all devices without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    devices = jax.device_count() if mesh.empty else mesh.size
    return jax.default_backend() == "cpu" and devices == 1


def _runs_cpu_path(cfg: ModelConfig, op: str, supported: bool, needs: str) -> bool:
    """The one decision: whether `op` takes its CPU path, by `choice(cfg, op)`. "xla" never;
    "cpu" always (a one-line error where it cannot; `needs` says what the op needs); "auto" on
    one CPU device where `supported` and, for a C++ kernel, the kernels load."""
    chosen = choice(cfg, op)
    if chosen == "xla":
        return False
    native = op in NATIVE_OPS
    if chosen == "cpu":
        if native:
            if jax.default_backend() != "cpu":
                raise ConfigError(
                    f"{op}='cpu' runs on CPU only; the default backend is "
                    f"{jax.default_backend()} (use 'auto' or 'xla')"
                )
            _warn_if_unprepared()
            build.require()
        if not supported:
            raise ConfigError(f"{op}='cpu' needs {needs}")
        return True
    if not (one_cpu_device() and supported):
        return False
    if native:
        _warn_if_unprepared()
        return build.available()
    return True


def _warn_if_unprepared() -> None:
    if not build.tried():
        logging.warning(
            "Building the CPU kernels while tracing: a job builds them when it "
            "starts, with echo_jax.lm.cpu.prepare(model_cfg, mesh)"
        )


def project_qkv(
    cfg: ModelConfig, x_BxLxD: jax.Array, ws_DxHxK: Sequence[jax.Array]
) -> tuple[jax.Array, ...]:
    """`x @ w` for each [D, H, K] matrix (the query, key and value projections)."""
    if not _runs_cpu_path(cfg, "dense_vjps", True, ""):
        return tuple(jnp.einsum("BLD,DHK->BLHK", x_BxLxD, w) for w in ws_DxHxK)
    B, L, D = x_BxLxD.shape
    ys_NxF = dense.project(x_BxLxD.reshape(B * L, D), tuple(w.reshape(D, -1) for w in ws_DxHxK))
    return tuple(y.reshape(B, L, *w.shape[1:]) for y, w in zip(ys_NxF, ws_DxHxK))


def swiglu_mlp(
    cfg: ModelConfig,
    x_NxD: jax.Array,
    w_gate_DxF: jax.Array,
    w_up_DxF: jax.Array,
    w_out_FxD: jax.Array,
) -> jax.Array:
    """`(silu(x @ w_gate) * (x @ w_up)) @ w_out` on rows flattened to 2-D."""
    if not _runs_cpu_path(cfg, "dense_vjps", True, ""):
        h_NxF = jax.nn.silu(x_NxD @ w_gate_DxF) * (x_NxD @ w_up_DxF)
        return h_NxF @ w_out_FxD
    kernel = _runs_cpu_path(
        cfg, "swiglu", x_NxD.dtype == jnp.float32, f"float32 activations, got {x_NxD.dtype}"
    )
    return dense.swiglu(x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD, kernel)


def rms_norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array | None) -> jax.Array:
    """`x * rsqrt(mean(x^2, -1) + cfg.norm_eps)`, times `scale` unless None, of float32 `x`."""
    if scale is None:
        if choice(cfg, "rms_norm") == "cpu":
            raise ConfigError(
                "rms_norm='cpu' needs norm='rms' (a learned scale); use 'auto' or 'xla'"
            )
    elif _runs_cpu_path(
        cfg,
        "rms_norm",
        cpu_rms_norm.supports(x),
        f"d_model a multiple of {cpu_rms_norm.LANES}, got {x.shape[-1]}",
    ):
        return cpu_rms_norm.rms_norm(x, scale, cfg.norm_eps)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
    return x if scale is None else x * scale


def attention(
    cfg: ModelConfig,
    q_BxLxHxK: jax.Array,
    k_BxLxHxK: jax.Array,
    v_BxLxHxK: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    smear_gate_H: jax.Array | None,
) -> jax.Array:
    """lm/attention.py's `self_attention` (training, no cache) of the raw projections."""
    if not _runs_cpu_path(
        cfg,
        "attention",
        cpu_attention.supports(q_BxLxHxK),
        f"float32 activations and a head dim in {cpu_attention.HEAD_DIMS}, got "
        f"{q_BxLxHxK.dtype} and {q_BxLxHxK.shape[-1]}",
    ):
        return xla_attention.self_attention(
            q_BxLxHxK,
            k_BxLxHxK,
            v_BxLxHxK,
            positions_BxL,
            segment_ids_BxL,
            smear_gate_H,
            cfg.rope_theta,
            cfg.attention_block,
        )
    # The kernel smears the keys and applies RoPE itself.
    L, H, K = q_BxLxHxK.shape[1:]
    cos_PxK2, sin_PxK2 = xla_attention.rope_tables(max(cfg.max_len, L), K, cfg.rope_theta)
    gate_H = jnp.zeros((H,)) if smear_gate_H is None else smear_gate_H
    return cpu_attention.attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, segment_ids_BxL, cos_PxK2, sin_PxK2, gate_H
    )
