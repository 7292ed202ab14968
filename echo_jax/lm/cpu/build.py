"""The C++ kernels (`kernels/*.cc`: attention, RMSNorm, SwiGLU): built, cached, registered.

The sources are compiled together with the host's C++ compiler (`-O3 -march=native`, ~5 s) into
one library in a cache keyed by the sources, the compiler, jaxlib and its FFI headers, and what
`-march=native` means on this CPU, so a checkout needs no build step. `require()` builds (or
finds) and registers it once per process, or raises why not; `available()` says whether that
worked. The kernels run as XLA FFI custom calls on XLA:CPU's own thread pool; attention.py,
rms_norm.py and swiglu.py wrap them.
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
import jaxlib
from absl import logging

KERNELS = pathlib.Path(__file__).with_name("kernels")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {
    "echo_attention_fwd": "EchoAttentionForward",
    "echo_attention_bwd": "EchoAttentionBackward",
    "echo_rms_norm_fwd": "EchoRmsNormForward",
    "echo_rms_norm_bwd": "EchoRmsNormBackward",
    "echo_swiglu_fwd": "EchoSwigluForward",
    "echo_swiglu_bwd": "EchoSwigluBackward",
}


class KernelUnavailable(RuntimeError):
    """The kernels could not be built or loaded on this host."""


def cache_dir() -> pathlib.Path:
    """$ECHO_JAX_CACHE/kernels, else ~/.cache/echo_jax/kernels; where that cannot be written (a
    read-only home), a fresh private temporary folder for this process."""
    root = os.environ.get("ECHO_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "echo_jax"
    )
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
    result = subprocess.run(
        [compiler, *_FLAGS[:3], "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
    )
    return result.stdout + platform.machine()


def _build() -> pathlib.Path:
    compiler = _compiler()
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = sorted((pathlib.Path(include) / "xla/ffi/api").glob("*.h"))
    sources = sorted(KERNELS.glob("*.cc"))
    key = hashlib.sha256(
        "\0".join(
            [
                *(f.read_text() for f in [*sources, *sorted(KERNELS.glob("*.h"))]),
                version,
                " ".join(_FLAGS),
                _target_signature(compiler),
                jaxlib.__version__,
                *(h.read_text() for h in headers),
            ]
        ).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"echo_cpu_kernels-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = pathlib.Path(tmp) / library.name
        command = [compiler, *_FLAGS, f"-I{include}", *map(str, sources), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise KernelUnavailable(
                f"compiling the CPU kernels failed ({' '.join(command)}):\n" + result.stderr[-2000:]
            )
        os.replace(partial, library)  # atomic: concurrent builders leave one complete file
    logging.info("Built the CPU kernels: %s", library)
    return library


@functools.cache
def _load() -> None:
    library = ctypes.CDLL(str(_build()))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )


def require() -> None:
    """Builds and registers the kernels (once per process), or raises `KernelUnavailable` saying
    why."""
    try:
        _load()
    except KernelUnavailable:
        raise
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"loading the CPU kernels failed: {e}") from e


@functools.cache
def available() -> bool:
    """Whether the kernels build and load here (logged once when they do not)."""
    try:
        require()
        return True
    except KernelUnavailable as e:
        logging.warning("CPU kernels unavailable, using XLA ops instead: %s", e)
        return False


def tried() -> bool:
    """Whether this process has built or tried to build the kernels (`require`, `available`)."""
    return _load.cache_info().currsize > 0 or available.cache_info().currsize > 0
