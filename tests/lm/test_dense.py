"""lm/dense.py's custom VJPs compute the plain expressions' values and gradients, alone and in
the model, and "auto" uses them on one CPU device only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from echo_jax.lm import dense, pretrain
from echo_jax.lm.model import ModelConfig, Transformer
from tests.lm.packing import ragged_packed


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _assert_same_value_and_grads(ours, plain, args, rtol=2e-5):
    (value, grads), (want_value, want_grads) = (
        jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))(*args)
        for f in (ours, plain))
    np.testing.assert_allclose(value, want_value, rtol=rtol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * np.abs(want).max())


def test_project_equals_its_matmuls():
    rng = np.random.default_rng(0)
    x, ws, weights = _normal(rng, 37, 16), tuple(_normal(rng, 16, 24) for _ in range(3)), \
        tuple(_normal(rng, 37, 24) for _ in range(3))

    def loss(project):
        return lambda x, *ws: sum((y * c).sum() for y, c in zip(project(x, ws), weights))

    _assert_same_value_and_grads(loss(dense.project),
                                 loss(lambda x, ws: tuple(x @ w for w in ws)), (x, *ws))


def test_swiglu_equals_its_expression():
    rng = np.random.default_rng(1)
    x, w_gate, w_up, w_out = (_normal(rng, 41, 16), _normal(rng, 16, 48), _normal(rng, 16, 48),
                              _normal(rng, 48, 16))
    weights = _normal(rng, 41, 16)

    def plain(x, w_gate, w_up, w_out):
        return ((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_out * weights).sum()

    _assert_same_value_and_grads(lambda *args: (dense.swiglu(*args) * weights).sum(), plain,
                                 (x, w_gate, w_up, w_out))


def test_model_with_dense_vjps_equals_autodiff():
    """Loss and every parameter gradient of a rematerialised model, both choices."""
    xla_cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, mlp_dim=128,
                          max_len=32, smear_keys=True, remat=True, attention_kernel="xla",
                          dense_grads="xla")
    tokens, positions, segments = ragged_packed(4, 32, seed=3)
    params = nn.meta.unbox(Transformer(xla_cfg).init(jax.random.key(0), tokens, positions,
                                                     segments)["params"])

    def loss_fn(cfg):
        def loss(params):
            logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, segments)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
        return jax.jit(jax.value_and_grad(loss))

    (want_loss, want_grads), (loss, grads) = (
        loss_fn(cfg)(params) for cfg in (xla_cfg, dataclasses.replace(xla_cfg, dense_grads="cpu")))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _uses_dense_vjps(cfg, mesh=None) -> bool:
    """Whether the model's gradient has lm/dense.py's barriers in it."""
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(0), tokens, tokens, tokens + 1)

    def loss(p):
        return Transformer(cfg).apply(p, tokens, tokens, tokens + 1)[0].sum()

    if mesh is None:
        return "optimization_barrier" in jax.jit(jax.grad(loss)).lower(params).as_text()
    with jax.set_mesh(mesh):
        return "optimization_barrier" in jax.jit(jax.grad(loss)).lower(params).as_text()


def test_auto_uses_dense_vjps_on_one_cpu_device_only():
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=16,
                      attention_kernel="xla")
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    four_devices = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert _uses_dense_vjps(cfg, one_device)
    assert not _uses_dense_vjps(cfg, four_devices)
    assert not _uses_dense_vjps(cfg)  # no mesh: the tests' 8 devices
    assert not _uses_dense_vjps(dataclasses.replace(cfg, dense_grads="xla"), one_device)
    assert _uses_dense_vjps(dataclasses.replace(cfg, dense_grads="cpu"), four_devices)


def test_choice_is_validated_and_not_recorded_in_checkpoints():
    with pytest.raises(ValueError, match="dense_grads must be 'auto', 'cpu' or 'xla'"):
        ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8,
                    dense_grads="fast")
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8)
    assert pretrain.config_meta(cfg) == pretrain.config_meta(
        dataclasses.replace(cfg, dense_grads="xla"))
