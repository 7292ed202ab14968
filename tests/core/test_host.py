"""The malloc settings of `echo_jax.core.host` stop XLA:CPU from page-faulting its temporary
buffer in again on every call (counted with getrusage, in a fresh process each)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")

SCRIPT = textwrap.dedent("""
    import resource
    import echo_jax
    import jax
    import jax.numpy as jnp

    # sin(x) is a 64 MB temporary that the matmul reads, so XLA must allocate it per call.
    f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())
    x, w = jnp.ones((4096, 4096)), jnp.ones((4096, 8))
    for _ in range(40):  # the heap grows until it holds the temporaries of overlapping calls
        f(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        f(x, w).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    print(echo_jax.MALLOC_TUNED, faults)
""")


def _run(script: str, tune: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "ECHO_JAX_TUNE_MALLOC": tune, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's process has
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )


def _parse(run: subprocess.CompletedProcess) -> tuple[bool, float]:
    """(echo_jax.MALLOC_TUNED, minor page faults per call in the steady state)."""
    out = run.stdout.split()
    return out[-2] == "True", float(out[-1])


def _faults_per_call(tune: str) -> tuple[bool, float]:
    return _parse(_run(SCRIPT, tune))


def test_tuned_malloc_keeps_xla_temporaries_mapped():
    tuned, tuned_faults = _faults_per_call("1")
    untuned, untuned_faults = _faults_per_call("0")
    assert tuned and not untuned
    # Untuned, each call faults the 64 MB temporary in again (16,384 pages of 4 KiB). Tuned, it
    # stays mapped: 0 in most runs; a late growth of the heap (the next call allocating before
    # the last one freed) can still fault in a temporary once in a while.
    assert untuned_faults > 8_000
    assert tuned_faults < untuned_faults / 5


def test_importing_echo_jax_after_jax_started_warns_and_changes_nothing():
    late = SCRIPT.replace("import echo_jax\n", "").replace(
        "import jax.numpy as jnp\n", "import jax.numpy as jnp\njax.devices()\nimport echo_jax\n"
    )
    run = _run(late)
    tuned, faults = _parse(run)
    assert not tuned and "imported after jax started its backends" in run.stderr
    assert faults > 8_000  # too late indeed: the temporary is faulted in on every call
