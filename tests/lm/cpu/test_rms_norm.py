"""The C++ RMSNorm kernel equals the model's XLA norm (values and gradients), alone and in the
model; "auto" uses it on one CPU device only; what it cannot run is a clear error for "cpu"."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.lm.cpu import build, ops
from echo_jax.lm.cpu import rms_norm as cpu_rms_norm
from echo_jax.lm.model import ModelConfig, Norm, Transformer, config_meta, init_cache
from tests.lm.cpu.model_checks import assert_same_loss_and_grads, lowered_text, with_choices


@pytest.mark.parametrize("shape", [(3, 37, 64), (130, 16), (2, 5, 7, 128)])
def test_kernel_equals_xla_norm(shape):
    """Rows that fill no whole chunk of the kernel's, several leading dims, large and tiny
    values (the rsqrt's epsilon matters for the near-zero rows)."""
    build.require()
    rng = np.random.default_rng(shape[-1])
    x = rng.normal(size=shape) * rng.choice([1e-4, 1.0, 30.0], size=(*shape[:-1], 1))
    x, weights = jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, size=shape[-1]), jnp.float32)
    xla_cfg = ModelConfig(
        vocab_size=8, d_model=shape[-1], n_layers=1, n_heads=1, mlp_dim=8, max_len=8, kernels="xla"
    )

    def xla(x, scale):
        return Norm(xla_cfg).apply({"params": {"scale": scale}}, x)

    def kernel(x, scale):
        return cpu_rms_norm.rms_norm(x, scale, ops.NORM_EPS)

    def loss(norm):
        return lambda x, scale: (norm(x, scale) * weights).sum()

    np.testing.assert_allclose(kernel(x, scale), xla(x, scale), rtol=1e-5, atol=1e-6)
    got, want = (jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, scale) for f in (kernel, xla))
    for g, w, name in zip(got, want, ("dx", "dscale")):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=name)


def test_scale_gradient_does_not_depend_on_threads():
    """Bitwise the same on repeated calls: per-chunk partials summed in a fixed order."""
    build.require()
    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.normal(size=(4096, 128)), jnp.float32) for _ in range(2))
    grad = jax.jit(
        jax.grad(lambda x, s: (cpu_rms_norm.rms_norm(x, s, ops.NORM_EPS) * dy).sum(), argnums=1)
    )
    first = np.asarray(grad(x, jnp.ones(128)))
    for _ in range(5):
        np.testing.assert_array_equal(grad(x, jnp.ones(128)), first)


def test_model_with_the_kernel_equals_xla():
    xla_cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_dim=128,
        max_len=32,
        smear_keys=True,
        kernel_overrides=(("attention", "xla"), ("rms_norm", "xla")),
    )
    assert_same_loss_and_grads(xla_cfg, with_choices(xla_cfg, rms_norm="cpu"), seed=5)


def test_cached_decoding_through_the_kernel_equals_xla():
    """The sampler's path: a prefill, then one token at a time through the KV cache."""
    build.require()
    xla_cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_dim=128,
        max_len=16,
        smear_keys=True,
        kernel_overrides=(("attention", "xla"), ("rms_norm", "xla")),
    )
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)), jnp.int32)
    positions, segments = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32)
    params = Transformer(xla_cfg).init(jax.random.key(0), tokens, positions, segments)

    def decode(cfg):
        model, cache = Transformer(cfg), init_cache(cfg, 2, 16)
        logits, cache = model.apply(
            params, tokens[:, :6], positions[:, :6], segments[:, :6], cache=cache, cache_index=0
        )
        steps = [logits]
        for i in range(6, 10):
            logits, cache = model.apply(
                params,
                tokens[:, i : i + 1],
                positions[:, i : i + 1],
                segments[:, i : i + 1],
                cache=cache,
                cache_index=i,
            )
            steps.append(logits)
        return np.concatenate(steps, 1)

    np.testing.assert_allclose(
        decode(with_choices(xla_cfg, rms_norm="cpu")), decode(xla_cfg), rtol=1e-5, atol=1e-5
    )


def _runs_kernel(cfg, mesh=None) -> bool:
    return "echo_rms_norm_fwd" in lowered_text(cfg, mesh)


def test_auto_runs_the_kernel_on_one_cpu_device_only():
    build.require()
    cfg = ModelConfig(
        vocab_size=8,
        d_model=64,
        n_layers=1,
        n_heads=2,
        mlp_dim=8,
        max_len=16,
        kernel_overrides=(("attention", "xla"),),
    )
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    four_devices = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert _runs_kernel(cfg, one_device)
    assert not _runs_kernel(cfg, four_devices)
    assert not _runs_kernel(cfg)  # no mesh: the tests' 8 devices
    assert not _runs_kernel(with_choices(cfg, rms_norm="xla"), one_device)
    assert not _runs_kernel(dataclasses.replace(cfg, d_model=72, n_heads=2), one_device)
    assert _runs_kernel(with_choices(cfg, rms_norm="cpu"), four_devices)


def test_what_the_kernel_cannot_run_is_an_error_for_cpu():
    with pytest.raises(ValueError, match="choice one of \\('auto', 'cpu', 'xla'\\)"):
        ModelConfig(
            vocab_size=8,
            d_model=64,
            n_layers=1,
            n_heads=2,
            mlp_dim=8,
            max_len=8,
            kernel_overrides=(("rms_norm", "fast"),),
        )
    tokens = jnp.zeros((1, 8), jnp.int32)
    cfg = ModelConfig(
        vocab_size=8,
        d_model=72,
        n_layers=1,
        n_heads=2,
        mlp_dim=8,
        max_len=8,
        kernel_overrides=(("rms_norm", "cpu"), ("attention", "xla")),
    )
    with pytest.raises(ValueError, match="'cpu' needs d_model a multiple of 16, got 72"):
        Transformer(cfg).init(jax.random.key(0), tokens, tokens, tokens + 1)
    with pytest.raises(ValueError, match="rms_norm='cpu' needs norm='rms'"):
        Transformer(dataclasses.replace(cfg, d_model=64, norm="layernorm")).init(
            jax.random.key(0), tokens, tokens, tokens + 1
        )
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8)
    assert config_meta(cfg) == config_meta(with_choices(cfg, rms_norm="xla"))
