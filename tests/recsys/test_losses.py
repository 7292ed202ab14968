"""Impression cross-entropy, and in-batch sampled softmax: accidental hits and the logQ sign."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from echo_jax.recsys import losses


def test_impression_cross_entropy_by_hand():
    scores = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = jnp.array([[1.0, 0, 0], [0, 1.0, 0]])
    expected = np.mean(
        [-np.log(np.exp(2) / (np.exp(2) + 2)), -np.log(np.e / (1 + np.e + np.exp(3)))]
    )
    np.testing.assert_allclose(losses.impression_cross_entropy(scores, labels), expected, rtol=1e-6)


def test_in_batch_logits_correct_for_log_q_and_mask_accidental_hits():
    user = jnp.eye(3)
    items = jnp.eye(3)
    ids = jnp.array([7, 7, 9])
    log_q = jnp.log(jnp.array([0.5, 0.5, 0.1]))
    logits = losses.in_batch_logits(user, items, ids, log_q)
    assert logits[0, 1] == losses.NEG_INF and logits[1, 0] == losses.NEG_INF  # same item 7
    np.testing.assert_allclose(jnp.diagonal(logits), 1.0 - log_q, rtol=1e-6)
    np.testing.assert_allclose(logits[2, 0], 0.0 - log_q[0], rtol=1e-6)


def _fit_item_biases(correction: float, num_items: int = 12, steps: int = 300) -> np.ndarray:
    """Item scores learned from in-batch softmax when clicks follow popularity q alone."""
    q = np.arange(1, num_items + 1, dtype=np.float32) ** 1.5
    q /= q.sum()
    log_q = jnp.log(jnp.asarray(q))
    tx = optax.adam(0.05)

    def loss(bias, ids):
        logits = losses.in_batch_logits(
            jnp.ones((len(ids), 1)), bias[ids][:, None], ids, correction * log_q[ids]
        )
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, -1)))

    def step(carry, key):
        bias, opt = carry
        ids = jax.random.choice(key, num_items, (64,), p=jnp.asarray(q))
        grads = jax.grad(loss)(bias, ids)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(bias, updates), opt), None

    bias = jnp.zeros(num_items)
    (bias, _), _ = jax.lax.scan(
        step, (bias, tx.init(bias)), jax.random.split(jax.random.key(0), steps)
    )
    return np.polyfit(np.log(q), np.asarray(bias), 1)[0]


def test_log_q_correction_sign_recovers_popularity():
    """With p(click) = q the full-softmax optimum is score = log q + c (slope 1). Uncorrected
    in-batch negatives cancel popularity (slope 0); the wrong sign would give slope -1."""
    assert 0.75 < _fit_item_biases(1.0) < 1.25
    assert abs(_fit_item_biases(0.0)) < 0.25
