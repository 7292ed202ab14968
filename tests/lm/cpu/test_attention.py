"""The fused C++ attention kernel (smeared keys, RoPE, attention) equals the model's XLA path
(outputs and gradients) on every real query, alone and in the model; padding queries output
zeros; an unbuildable kernel is a clear error for "cpu" and a fallback to XLA for "auto"."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.lm import attention
from echo_jax.lm.cpu import attention as cpu_attention
from echo_jax.lm.cpu import build
from echo_jax.lm.model import ModelConfig, Transformer, config_meta
from tests.conftest import REPO
from tests.lm.cpu.model_checks import assert_same_loss_and_grads, lowered_text, with_choices
from tests.lm.packing import ragged_packed


# Unshuffled rows take the kernel's per-example key ranges, shuffled ones its whole-row path.
@pytest.mark.parametrize(
    "length,head_dim,shuffled",
    [(40, 32, False), (5, 64, False), (37, 128, False), (48, 32, True), (23, 64, True)],
)
def test_kernel_equals_xla_attention(length, head_dim, shuffled):
    """Smeared keys, RoPE and dense attention as the model's XLA path computes them."""
    build.require()
    batch, heads, theta = 3, 2, 10_000.0
    _, positions, segments = ragged_packed(batch, length, seed=length, shuffled=shuffled)
    rng = np.random.default_rng(head_dim)
    q, k, v = (
        jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
        for _ in range(3)
    )
    gate = jnp.asarray(rng.uniform(size=heads), jnp.float32)
    real = (segments > 0)[:, :, None, None]
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real  # reads real rows only

    def loss(attend):
        return lambda *args: (attend(*args) * weights).sum()

    def xla(q, k, v, gate):
        k = attention.rope(attention.smear_keys(k, positions, gate), positions, theta)
        return attention.dense_attention(
            attention.rope(q, positions, theta),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            positions,
            segments,
            positions,
            segments,
        )

    cos, sin = attention.rope_tables(length, head_dim, theta)
    kernel = jax.jit(
        lambda q, k, v, gate: cpu_attention.attention(q, k, v, positions, segments, cos, sin, gate)
    )
    want, got = xla(q, k, v, gate), kernel(q, k, v, gate)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)
    np.testing.assert_array_equal(np.where(real, 0, got), 0)  # padding queries: zeros
    want_grads = jax.grad(loss(xla), (0, 1, 2, 3))(q, k, v, gate)
    got_grads = jax.jit(jax.grad(loss(kernel), (0, 1, 2, 3)))(q, k, v, gate)
    for name, want_grad, got_grad in zip("qkvg", want_grads, got_grads):
        np.testing.assert_allclose(got_grad, want_grad, atol=2e-5, rtol=1e-5, err_msg=name)
    # Padding queries' outputs are constant zeros: a cotangent on them changes no gradient.
    weights = weights + jnp.asarray(rng.normal(size=q.shape), jnp.float32) * ~real
    padded_grads = jax.jit(jax.grad(loss(kernel), (0, 1, 2, 3)))(q, k, v, gate)
    for name, grad, padded_grad in zip("qkvg", got_grads, padded_grads):
        np.testing.assert_array_equal(padded_grad, grad, err_msg=name)


def test_positions_outside_the_rope_table_are_an_error():
    build.require()
    q = jnp.ones((1, 8, 2, 32))
    positions = jnp.arange(8)[None]
    cos, sin = attention.rope_tables(4, 32, 10_000.0)
    with pytest.raises(Exception, match=r"position lies outside the RoPE table \[0, 4\)"):
        jax.block_until_ready(
            cpu_attention.attention(q, q, q, positions, positions * 0 + 1, cos, sin, jnp.zeros(2))
        )


def test_model_with_kernel_equals_xla():
    """Loss and parameter gradients of a (rematerialised) model, kernel vs XLA blocked path."""
    xla_cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_dim=128,
        max_len=48,
        smear_keys=True,
        remat=True,
        attention_block=16,
        kernel_overrides=(("attention", "xla"),),
    )
    assert_same_loss_and_grads(xla_cfg, with_choices(xla_cfg, attention="cpu"), seed=7)


def _runs_kernel(cfg, mesh=None) -> bool:
    """Whether the model's forward pass lowers to the kernel's custom call."""
    return "echo_attention_fwd" in lowered_text(cfg, mesh)


def test_auto_runs_the_kernel_on_one_cpu_device_only():
    build.require()
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=16)
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    four_devices = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert _runs_kernel(cfg, one_device)
    assert not _runs_kernel(cfg, four_devices)
    assert not _runs_kernel(cfg)  # no mesh: the tests' 8 devices
    assert not _runs_kernel(with_choices(cfg, attention="xla"), one_device)
    assert not _runs_kernel(dataclasses.replace(cfg, kernels="xla"), one_device)
    assert _runs_kernel(with_choices(cfg, attention="cpu"), four_devices)


def test_checkpoints_do_not_record_the_kernel_choice():
    """A run resumes, and RL/eval restore it, whichever kernels they pick."""
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8)
    assert config_meta(cfg) == config_meta(with_choices(cfg, attention="xla"))
    assert config_meta(cfg) == config_meta(dataclasses.replace(cfg, kernels="xla"))
    assert config_meta(cfg) != config_meta(dataclasses.replace(cfg, d_model=32))


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="kernels must be 'auto' or 'xla'"):
        ModelConfig(
            vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8, kernels="fast"
        )
    with pytest.raises(ValueError, match="kernel_overrides holds"):
        ModelConfig(
            vocab_size=8,
            d_model=64,
            n_layers=1,
            n_heads=2,
            mlp_dim=8,
            max_len=8,
            kernel_overrides=(("attention", "fast"),),
        )
    cfg = ModelConfig(
        vocab_size=8,
        d_model=64,
        n_layers=1,
        n_heads=2,
        mlp_dim=8,
        max_len=8,
        dtype="bfloat16",
        kernel_overrides=(("attention", "cpu"),),
    )
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="needs float32 activations and a head dim"):
        Transformer(cfg).init(jax.random.key(0), tokens, tokens, tokens + 1)


_NO_COMPILER = """
import jax.numpy as jnp, jax
from echo_jax.lm import cpu
from echo_jax.lm.model import ModelConfig, Transformer
tokens = jnp.zeros((1, 8), jnp.int32)
for choice in ("auto", "cpu"):
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8,
                      kernel_overrides=(("attention", choice),))
    try:
        cpu.prepare(cfg)
        Transformer(cfg).init(jax.random.key(0), tokens, tokens, tokens + 1)
        print(choice, "ran")
    except cpu.build.KernelUnavailable as e:
        print(choice, "refused:", e)
"""


def test_without_a_compiler_auto_falls_back_and_cpu_refuses(tmp_path):
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "ECHO_JAX_CACHE": str(tmp_path / "cache"),
        "XLA_FLAGS": "",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "auto ran"
    assert "CPU kernels unavailable, using XLA ops instead" in result.stderr
    assert lines[1] == f"cpu refused: the C++ compiler CXX={env['CXX']} was not found"


def test_cache_dir_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ECHO_JAX_CACHE", str(blocker / "cache"))  # cannot be created
    path = build.cache_dir()
    assert path.is_dir() and not str(path).startswith(str(blocker))
    assert path.stat().st_mode & 0o777 == 0o700 and path.stat().st_uid == os.getuid()
