"""The fused CPU attention kernel (`kernels/cpu_attention.cc`) as a JAX function.

XLA:CPU runs training attention as separate ops that stream [Q, S] tensors through memory, at a
fraction of its matmul rate for head dims of 32 (benchmarks/RESULTS.md). The kernel is an XLA
FFI custom call: one task per (row, head) on XLA's own thread pool, only the keys each query
can see (its own packed example, up to itself), the probabilities recomputed in the backward
pass from the saved log-sum-exp as flash attention does.

The C++ source is compiled with the host's C++ compiler on first use (`-O3 -march=native`,
~5 s) into a cache keyed by the source, the compiler, jaxlib and its FFI headers, and what
`-march=native` means on this CPU, so a checkout needs no build step; `available()` says whether that worked, `require()` raises why
not. Shape legend: B batch, L length, H heads, K head dim.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging

SOURCE = pathlib.Path(__file__).with_name("kernels") / "cpu_attention.cc"
HEAD_DIMS = (32, 64, 128)
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"echo_attention_fwd": "EchoAttentionForward",
            "echo_attention_bwd": "EchoAttentionBackward"}


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded on this host."""


def cache_dir() -> pathlib.Path:
    """$ECHO_JAX_CACHE/kernels, else ~/.cache/echo_jax/kernels; where that cannot be written (a
    read-only home), a fresh private temporary folder for this process."""
    root = os.environ.get("ECHO_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "echo_jax")
    path = pathlib.Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return _private_temp_dir()


@functools.cache
def _private_temp_dir() -> pathlib.Path:
    # mkdtemp: mode 0700 and a fresh name, so no other user can plant a library there.
    return pathlib.Path(tempfile.mkdtemp(prefix="echo_jax-kernels-"))


def _compiler() -> str:
    if os.environ.get("CXX"):
        if not shutil.which(os.environ["CXX"]):
            raise KernelUnavailable(f"the C++ compiler CXX={os.environ['CXX']} was not found")
        return os.environ["CXX"]
    compiler = shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler found (install g++ or set CXX)")
    return compiler


def _target_signature(compiler: str) -> str:
    """What `-march=native` means on this host (the compiler's predefined macros for it): code
    built for one CPU is only reused on a CPU with the same features."""
    result = subprocess.run([compiler, *_FLAGS[:3], "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True)
    return result.stdout + platform.machine()


def _build() -> pathlib.Path:
    compiler = _compiler()
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = sorted((pathlib.Path(include) / "xla/ffi/api").glob("*.h"))
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), version, " ".join(_FLAGS), _target_signature(compiler),
        jaxlib.__version__, *(h.read_text() for h in headers)]).encode()).hexdigest()[:16]
    library = cache_dir() / f"cpu_attention-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = pathlib.Path(tmp) / library.name
        command = [compiler, *_FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed ({' '.join(command)}):\n"
                                    + result.stderr[-2000:])
        os.replace(partial, library)  # atomic: concurrent builders leave one complete file
    logging.info("Built the CPU attention kernel: %s", library)
    return library


@functools.cache
def _load() -> None:
    library = ctypes.CDLL(str(_build()))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")


def require() -> None:
    """Builds and registers the kernel, or raises `KernelUnavailable` saying why."""
    try:
        _load()
    except KernelUnavailable:
        raise
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"loading the CPU attention kernel failed: {e}") from e


@functools.cache
def available() -> bool:
    """Whether the kernel builds and loads here (logged once when it does not)."""
    try:
        require()
        return True
    except KernelUnavailable as e:
        logging.warning("CPU attention kernel unavailable, using XLA attention: %s", e)
        return False


def supports(q_BxLxHxK: jax.Array) -> bool:
    """Shapes and dtype the kernel handles: float32 and a head dim in `HEAD_DIMS`."""
    return q_BxLxHxK.dtype == jnp.float32 and q_BxLxHxK.shape[-1] in HEAD_DIMS


def attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
              positions_BxL: jax.Array, segment_ids_BxL: jax.Array, rope_cos_PxK2: jax.Array,
              rope_sin_PxK2: jax.Array, smear_gate_H: jax.Array) -> jax.Array:
    """Causal softmax attention of a packed sequence over itself from the raw projections: keys
    smeared by `smear_gate_H` (zeros: none), queries and keys rotated by RoPE (tables indexed by
    position, as `model.rope_tables`), then `attention_mask`'s semantics (lm/attention.py); a
    query that sees no key (padding) outputs zeros. Positions must index the tables. Reverse-mode
    differentiable (not in the tables). Call `require()` first."""
    return _attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL.astype(jnp.int32),
                      segment_ids_BxL.astype(jnp.int32), rope_cos_PxK2, rope_sin_PxK2,
                      smear_gate_H.astype(jnp.float32))


def _forward_call(*operands):
    q = operands[0]
    B, L, H, _ = q.shape
    return jax.ffi.ffi_call("echo_attention_fwd", (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((B, H, L), jnp.float32)), vmap_method="sequential")(*operands)


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
    dq, dk, dv, dgate_BxH = jax.ffi.ffi_call("echo_attention_bwd", (
        grad, grad, grad, jax.ShapeDtypeStruct((q.shape[0], gate.shape[0]), jnp.float32)),
        vmap_method="sequential")(*operands, out, lse, dout)
    return dq, dk, dv, None, None, None, None, dgate_BxH.sum(0)


_attention.defvjp(_attention_fwd, _attention_bwd)
