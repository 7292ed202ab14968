"""The model's CPU speed work in one corner: C++ kernels (XLA FFI custom calls) for training
attention, RMSNorm and SwiGLU's elementwise part, custom VJPs for XLA:CPU's matmuls, and the one
decision of when they run (ops.py).

- `ops`: the model's compute ops (attention, norm, projections, MLP), each through XLA or its CPU
  path, as `ModelConfig.kernels` / `kernel_overrides` and the step's devices say;
- `build`: compiles `kernels/*.cc` with the host's C++ compiler into a cached library;
- `attention`, `rms_norm`, `swiglu`: the kernels as JAX functions; `dense`: the custom VJPs.

A job calls `prepare(model_cfg, mesh)` when it starts, before it traces the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from echo_jax.lm.cpu import build, ops

if TYPE_CHECKING:
    from echo_jax.lm.model import ModelConfig


def prepare(model_cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> None:
    """Builds and loads the C++ kernels where a model of `model_cfg` on `mesh` (None: all
    devices) may run one: "auto" on a one-device CPU mesh (a failed build is logged and XLA's ops
    run instead) or a "cpu" override (a failed build raises `build.KernelUnavailable`).

    Jobs call it before tracing; a model traced without it builds them then, with a warning."""
    chosen = {ops.choice(model_cfg, op) for op in ops.NATIVE_OPS}
    if "cpu" in chosen:
        build.require()
    elif "auto" in chosen and ops.one_cpu_device(mesh):
        build.available()
