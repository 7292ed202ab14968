"""Training losses: the study's impression cross-entropy and in-batch sampled softmax.

Shapes: B batch, C candidates (1 positive + k negatives), D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The logit of a masked-out candidate, the recommender's one masking value: finite, so a row's
# log-softmax and its gradient stay finite, and so far below any real score that its
# probability underflows to exactly 0 in float32.
NEG_INF = -1e9


def impression_cross_entropy(scores_BxC: jax.Array, labels_BxC: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the clicked candidate against the shown negatives."""
    log_p = jax.nn.log_softmax(scores_BxC, axis=-1)
    return -jnp.mean((log_p * labels_BxC).sum(-1) / labels_BxC.sum(-1))


def in_batch_logits(
    user_BxD: jax.Array, item_BxD: jax.Array, item_id_B: jax.Array, log_q_B: jax.Array
) -> jax.Array:
    """Logits `[B, B]` of every user against every positive in the batch, logQ-corrected.

    In-batch negatives are sampled in proportion to their frequency q as positives, so popular
    items are over-represented as negatives; subtracting log q (Yi et al., RecSys 2019) makes the
    sampled softmax estimate the full softmax. A column holding the same item as the row's own
    positive (an accidental hit) is masked out, except on the diagonal.
    """
    logits = user_BxD @ item_BxD.T - log_q_B[None, :]
    same = item_id_B[:, None] == item_id_B[None, :]
    accidental = same & ~jnp.eye(len(item_id_B), dtype=bool)
    return jnp.where(accidental, NEG_INF, logits)


def in_batch_softmax(
    user_BxD: jax.Array, item_BxD: jax.Array, item_id_B: jax.Array, log_q_B: jax.Array
) -> jax.Array:
    """Mean cross-entropy of each user's own positive (the diagonal) among the batch's items."""
    logits = in_batch_logits(user_BxD, item_BxD, item_id_B, log_q_B)
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
