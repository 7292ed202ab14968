"""Next-token pretraining on the style mixture: state, loss, pure train step and evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from echo_jax.core.train_state import TrainState
from echo_jax.lm.model import ModelConfig, Transformer


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen model config a module receives (no ConfigDict past this point)."""
    return ModelConfig(**config.model.to_dict())


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW, linear warmup then cosine decay to `min_lr_ratio` x peak, global-norm clipping.
    Norm scales and 1-D gates are not decayed."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        train.lr,
        train.warmup_steps,
        max(train.num_steps, train.warmup_steps + 1),
        end_value=train.lr * train.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(
            schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay, mask=decay_mask
        ),
    )


def make_init_state(model: Transformer, tx: optax.GradientTransformation, seq_len: int):
    def init_state(rng: jax.Array) -> TrainState:
        dummy = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(rng, dummy, dummy, dummy + 1)["params"]
        return TrainState.create(params, tx)

    return init_state


def token_nll(model: Transformer, params: Any, batch: Mapping[str, jax.Array]):
    """Per-token negative log-likelihood of the targets, [B, L], and the loss mask."""
    logits_BxLxV, _ = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    # logsumexp minus the target's logit: the same value as -log_softmax[target], but XLA:CPU
    # does not write the [B, L, V] log-probabilities out (a tiny step ~2 ms faster,
    # benchmarks/RESULTS.md).
    with jax.named_scope("loss"):  # names the ops for benchmarks/profile_step.py
        target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[
            ..., 0
        ]
        nll_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_logit_BxL
    return nll_BxL, batch["loss_mask"].astype(jnp.float32)


def make_train_step(model: Transformer, tx: optax.GradientTransformation):
    def loss_fn(params, batch):
        nll, mask = token_nll(model, params, batch)
        count = mask.sum()
        return (nll * mask).sum() / jnp.maximum(count, 1.0), count

    def train_step(state: TrainState, batch, rng: jax.Array) -> tuple[TrainState, dict]:
        del rng  # Pretraining is deterministic given the batch (no dropout).
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
        return state.apply_gradients(grads, tx), metrics

    return train_step


def make_eval_fn(model: Transformer, eval_batches: Mapping[str, list[dict[str, np.ndarray]]]):
    """Per-style validation loss over fixed batches: `state -> {"val/loss/<style>": float}`."""

    @jax.jit
    def nll_sums(params, batch):
        nll, mask = token_nll(model, params, batch)
        return (nll * mask).sum(), mask.sum()

    def evaluate(state: TrainState) -> dict[str, float]:
        out = {}
        for style, batches in eval_batches.items():
            sums = np.array([jax.device_get(nll_sums(state.params, b)) for b in batches])
            out[f"val/loss/{style}"] = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
        if out:
            out["val/loss"] = float(np.mean(list(out.values())))
        return out

    return evaluate


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (incl. the output layer) plus causal-free
    attention 6 x 2 x layers x seq_len x d_model (PaLM appendix B convention)."""
    per_layer = (
        cfg.d_model * 3 * cfg.d_model + cfg.d_model * cfg.d_model + cfg.d_model * 3 * cfg.mlp_dim
    )
    matmul_params = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * seq_len * cfg.d_model
