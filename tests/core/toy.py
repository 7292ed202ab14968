"""A toy regression task for exercising the shared training loop without any track."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from echo_jax.core.train_loop import TrainTask
from echo_jax.core.train_state import TrainState


class _Source:
    def __init__(self, dim: int):
        self.dim = dim
        self.w = np.random.default_rng(0).normal(size=(dim,)).astype(np.float32)

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        x = np.random.default_rng(i).normal(size=(self.dim,)).astype(np.float32)
        return {"x": x, "y": np.float32(x @ self.w)}


def toy_iterator(dim: int = 8, batch_size: int = 8, seed: int = 0, on_batch=None):
    ds = grain.MapDataset.source(_Source(dim)).shuffle(seed=seed).repeat()
    ds = ds.to_iter_dataset().batch(batch_size)
    return iter(ds.map(on_batch) if on_batch else ds)


def toy_task(dim: int = 8, lr: float = 0.05, nan_at_step: int | None = None) -> TrainTask:
    tx = optax.sgd(lr)

    def init_state(rng):
        w = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))(rng, (dim,))
        params = {"w": w}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def train_step(state, batch, rng):
        def loss_fn(params):
            return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        if nan_at_step is not None:  # the step number after this update
            loss = jnp.where(state.step + 1 == nan_at_step, jnp.nan, loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss}

    return TrainTask(
        init_state=init_state,
        train_step=train_step,
        train_iter=toy_iterator(dim),
        meta={"model": {"dim": dim}},
    )
