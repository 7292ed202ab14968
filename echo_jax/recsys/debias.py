"""The study's black-box source debiaser: make scores invariant to an LLM rewrite of the text.

It needs no source labels. `R` maps every text row to an LLM rewrite of that text, whatever its
source: the human (HGC) text to its AIGC copy and the AIGC text to a second rewrite, as the
study's code does. With scores s = dot(user, item),

    L = CE + alpha * L1(s(u, C), s(u, R(C))) + beta * [L1(s(u, C), s(u~, C)) + H(u) + H(u~)]

where u~ is the user encoded from the history with each item rewritten with probability
`rewrite_prob`, L1 is the mean absolute difference and H the mean entropy of the softmax over
a user vector's dimensions (the study's "entropy terms"). The study uses alpha = 1.0,
beta = 0.01; alpha = beta = 0 is the undebiased loss.

Shapes: B batch, H history length, C candidates, D width, R text rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from echo_jax.core.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Debias:
    alpha: float = 0.0
    beta: float = 0.0
    rewrite_prob: float = 0.5

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(
                f"debias.alpha and debias.beta must be >= 0, got {self.alpha}, {self.beta}"
            )
        if not 0.0 <= self.rewrite_prob <= 1.0:
            raise ConfigError(f"debias.rewrite_prob must be in [0, 1], got {self.rewrite_prob}")

    @property
    def enabled(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | None) -> Debias:
        if cfg is None:
            return cls()
        return cls(float(cfg.alpha), float(cfg.beta), float(cfg.rewrite_prob))


def rewrite_rows(num_items: int, num_sources: int) -> np.ndarray:
    """`[R]` the row of each text row's rewrite, for the row layout `source * N + item` with
    sources `(hgc, aigc, aigc rewrite)`: source s maps to s + 1; the last source to itself."""
    if num_sources < 3:
        raise ConfigError("the debiaser needs a third text source, the rewrite of the AIGC text")
    rows = np.arange(num_items * num_sources)
    return np.where(rows < num_items * (num_sources - 1), rows + num_items, rows).astype(np.int32)


def perturb_history(
    rng: jax.Array, history_BxH: jax.Array, rewrite_R: jax.Array, prob: float
) -> jax.Array:
    """Each history row replaced by its rewrite with probability `prob` (padding included: its
    position is masked anyway)."""
    swap = jax.random.bernoulli(rng, prob, history_BxH.shape)
    return jnp.where(swap, rewrite_R[history_BxH], history_BxH)


def mean_entropy(x_BxD: jax.Array) -> jax.Array:
    """Mean over rows of the entropy of softmax(x) over the D dimensions."""
    log_p = jax.nn.log_softmax(x_BxD, axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def penalty(
    scores_BxC: jax.Array,
    scores_rewritten_items_BxC: jax.Array,
    scores_perturbed_user_BxC: jax.Array,
    user_BxD: jax.Array,
    perturbed_user_BxD: jax.Array,
    debias: Debias,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The regulariser added to the cross-entropy, and its parts as metrics."""
    items_l1 = jnp.mean(jnp.abs(scores_BxC - scores_rewritten_items_BxC))
    users_l1 = jnp.mean(jnp.abs(scores_BxC - scores_perturbed_user_BxC))
    entropy = mean_entropy(user_BxD) + mean_entropy(perturbed_user_BxD)
    total = debias.alpha * items_l1 + debias.beta * (users_l1 + entropy)
    return total, {
        "debias/items_l1": items_l1,
        "debias/users_l1": users_l1,
        "debias/entropy": entropy,
    }
