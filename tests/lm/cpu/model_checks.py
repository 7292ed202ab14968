"""Checks shared by the tests of the model's CPU paths (C++ kernels, custom VJPs)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from echo_jax.lm.model import ModelConfig, Transformer
from tests.lm.packing import ragged_packed


def with_choices(cfg: ModelConfig, **choices: str) -> ModelConfig:
    """`cfg` with `kernel_overrides` also setting these ops (lm/cpu/ops.py): attention="cpu"."""
    return dataclasses.replace(
        cfg, kernel_overrides=tuple({**dict(cfg.kernel_overrides), **choices}.items())
    )


def assert_same_loss_and_grads(
    reference: ModelConfig, other: ModelConfig, seed: int, atol: float = 2e-6, mesh=None
) -> None:
    """The next-token loss over ragged packed rows (padding masked) and every parameter's
    gradient agree between two configs of the same model, on the same parameters; `other` runs
    under `mesh` (None: no mesh)."""
    tokens, positions, segments = ragged_packed(4, reference.max_len, seed=seed)
    params = nn.meta.unbox(
        Transformer(reference).init(jax.random.key(0), tokens, positions, segments)["params"]
    )

    def value_and_grad(cfg):
        def loss(params):
            logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, segments)
            logp = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
            return (nll * (segments[:, 1:] > 0)).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = value_and_grad(reference)
    if mesh is None:
        loss, grads = value_and_grad(other)
    else:
        with jax.set_mesh(mesh):
            loss, grads = value_and_grad(other)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
        np.testing.assert_allclose(got, want, atol=atol, err_msg=jax.tree_util.keystr(path))


def lowered_text(cfg: ModelConfig, mesh=None, gradient: bool = False) -> str:
    """The model's forward pass (or its gradient) lowered under `mesh` (None: no mesh), as text."""
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = Transformer(dataclasses.replace(cfg, kernels="xla", kernel_overrides=())).init(
        jax.random.key(0), tokens, tokens, tokens + 1
    )

    def forward(p):
        return Transformer(cfg).apply(p, tokens, tokens, tokens + 1)[0]

    fn = jax.grad(lambda p: forward(p).sum()) if gradient else forward
    if mesh is None:
        return jax.jit(fn).lower(params).as_text()
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(params).as_text()
