"""lm/cpu/dense.py's custom VJPs compute the plain expressions' values and gradients, alone and
in the model, with SwiGLU's elementwise part in XLA or in the C++ kernel (lm/cpu/swiglu.py), and
"auto" uses them on one CPU device only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.lm.cpu import build, dense
from echo_jax.lm.model import ModelConfig, config_meta
from tests.lm.cpu.model_checks import assert_same_loss_and_grads, lowered_text, with_choices


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _assert_same_value_and_grads(ours, plain, args, rtol=2e-5):
    (value, grads), (want_value, want_grads) = (
        jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))(*args)
        for f in (ours, plain)
    )
    np.testing.assert_allclose(value, want_value, rtol=rtol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * np.abs(want).max())


def test_project_equals_its_matmuls():
    rng = np.random.default_rng(0)
    x, ws, weights = (
        _normal(rng, 37, 16),
        tuple(_normal(rng, 16, 24) for _ in range(3)),
        tuple(_normal(rng, 37, 24) for _ in range(3)),
    )

    def loss(project):
        return lambda x, *ws: sum((y * c).sum() for y, c in zip(project(x, ws), weights))

    _assert_same_value_and_grads(
        loss(dense.project), loss(lambda x, ws: tuple(x @ w for w in ws)), (x, *ws)
    )


# 41 x 50 and 97 x 83 elements are not multiples of the kernel's 16 lanes (its scalar tail runs),
# and 97 x 83 > 4096 makes two chunks. Inputs scaled up so some gates saturate the sigmoid.
@pytest.mark.parametrize("rows,hidden,kernel", [(41, 50, False), (41, 50, True), (97, 83, True)])
def test_swiglu_equals_its_expression(rows, hidden, kernel):
    if kernel:
        build.require()
    rng = np.random.default_rng(rows)
    x, w_gate, w_up, w_out = (
        _normal(rng, rows, 16) * 4,
        _normal(rng, 16, hidden),
        _normal(rng, 16, hidden),
        _normal(rng, hidden, 16),
    )
    weights = _normal(rng, rows, 16)

    def plain(x, w_gate, w_up, w_out):
        return ((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_out * weights).sum()

    def ours(*args):
        return (dense.swiglu(*args, kernel) * weights).sum()

    _assert_same_value_and_grads(ours, plain, (x, w_gate, w_up, w_out))


def test_model_with_dense_vjps_equals_autodiff():
    """Loss and every parameter gradient of a rematerialised model, SwiGLU in XLA or the kernel."""
    build.require()
    xla_cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_dim=128,
        max_len=32,
        smear_keys=True,
        remat=True,
        kernel_overrides=(("attention", "xla"), ("dense_vjps", "xla"), ("swiglu", "xla")),
    )
    for swiglu in ("xla", "cpu"):
        assert_same_loss_and_grads(
            xla_cfg, with_choices(xla_cfg, dense_vjps="cpu", swiglu=swiglu), seed=3
        )


def _uses(cfg, mesh=None) -> tuple[bool, bool]:
    """(lm/cpu/dense.py's barriers, the SwiGLU kernel) in the model's gradient."""
    hlo = lowered_text(cfg, mesh, gradient=True)
    return "optimization_barrier" in hlo, "echo_swiglu_bwd" in hlo


def test_auto_uses_dense_vjps_and_the_swiglu_kernel_on_one_cpu_device_only():
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
    assert _uses(cfg, one_device) == (True, True)
    assert _uses(cfg, four_devices) == (False, False)
    assert _uses(cfg) == (False, False)  # no mesh: the tests' 8 devices
    assert _uses(with_choices(cfg, swiglu="xla"), one_device) == (True, False)
    assert _uses(with_choices(cfg, dense_vjps="xla"), one_device) == (False, False)
    assert _uses(dataclasses.replace(cfg, kernels="xla"), one_device) == (False, False)
    assert _uses(with_choices(cfg, dense_vjps="cpu"), four_devices) == (True, False)
    assert _uses(with_choices(cfg, dense_vjps="cpu", swiglu="cpu"), four_devices) == (True, True)


def test_choices_are_validated_and_not_recorded_in_checkpoints():
    sizes = dict(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8)
    for op in ("dense_vjps", "swiglu"):
        with pytest.raises(ValueError, match=r"choice one of \('auto', 'cpu', 'xla'\)"):
            ModelConfig(**sizes, kernel_overrides=((op, "fast"),))
    with pytest.raises(ValueError, match="kernel_overrides holds"):
        ModelConfig(**sizes, kernel_overrides=(("mlp", "xla"),))
    with pytest.raises(ValueError, match="swiglu='cpu' runs inside the dense_vjps custom VJPs"):
        ModelConfig(**sizes, kernel_overrides=(("dense_vjps", "xla"), ("swiglu", "cpu")))
    with pytest.raises(ValueError, match="swiglu='cpu' runs inside the dense_vjps custom VJPs"):
        ModelConfig(**sizes, kernels="xla", kernel_overrides=(("swiglu", "cpu"),))
    cfg = ModelConfig(**sizes)
    assert config_meta(cfg) == config_meta(with_choices(cfg, dense_vjps="xla", swiglu="xla"))


def test_all_auto_paths_on_one_cpu_device_equal_xla():
    """What a single-device CPU run gets by default (the attention, norm and SwiGLU kernels and
    the dense VJPs together) against XLA everywhere: loss and every gradient."""
    build.require()
    xla_cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_dim=128,
        max_len=32,
        smear_keys=True,
        attention_block=16,
        kernels="xla",
    )
    auto_cfg = dataclasses.replace(xla_cfg, kernels="auto")
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    hlo = lowered_text(auto_cfg, one_device, gradient=True)
    for target in (
        "echo_attention_bwd",
        "echo_rms_norm_bwd",
        "echo_swiglu_bwd",
        "optimization_barrier",
    ):
        assert target in hlo, target
    assert_same_loss_and_grads(xla_cfg, auto_cfg, seed=11, mesh=one_device)
