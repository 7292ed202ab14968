"""Named random streams: every seed a job derives from its one `seed`, in one place.

Each number here is part of the results (changing one changes every run that uses it, and the
stored numbers of benchmarks/RESULTS.md), so they are named rather than changed. A job adds its
own streams here instead of writing `seed + 1` or a bare purpose number where it draws.
"""

from __future__ import annotations

import enum

import numpy as np

# --- RL post-training (echo_jax/lm/rl/policy_eval.py) -------------------------------------------
# Evaluation during RL samples with `jax.random.key(seed + RL_EVAL)`, apart from the run's stream
# (`key(seed)`, split by the training loop), and the same key at every evaluation.
RL_EVAL = 1


# --- the recommender (echo_jax/recsys/jobs/train.py) -------------------------------------------
# Which history items of an impression show their AIGC text (`encode_impressions(swap_seed=)`):
# the training impressions use `seed + TRAIN_SWAP`, the evaluation impressions `seed + EVAL_SWAP`.
TRAIN_SWAP = 0
EVAL_SWAP = 1


# --- the feedback loop (echo_jax/recsys/feedback_loop.py) ---------------------------------------
class LoopPurpose(enum.IntEnum):
    """What a numpy stream `loop_stream(seed, iteration, purpose)` of the loop draws."""

    TRAIN_SWAP = 0  # the history items of the iteration's training half shown in AIGC text
    CLICKS = 1  # the tie-breaks of the ranking and the position-biased clicks
    NEGATIVES = 2  # the negatives and the candidate order of the click-built impressions
    DEV_SWAP = 3  # the dev histories swapped at the iteration's click share


# Iteration t of the loop run with seed s trains with seed `s * LOOP_SEED_STRIDE + t`.
LOOP_SEED_STRIDE = 1000


def loop_stream(seed: int, iteration: int, purpose: LoopPurpose) -> np.random.Generator:
    """The independent numpy stream of one purpose in one loop iteration."""
    return np.random.default_rng([seed, iteration, int(purpose)])


def loop_epoch_stream(
    seed: int, iteration: int, purpose: LoopPurpose, epoch: int
) -> np.random.Generator:
    """`loop_stream` for epoch `epoch` of an iteration whose clicks are drawn anew each epoch
    (epoch 0 is `loop_stream` itself)."""
    if epoch == 0:
        return loop_stream(seed, iteration, purpose)
    return np.random.default_rng([seed, iteration, int(purpose), epoch])


def loop_train_seed(seed: int, iteration: int) -> int:
    """The seed of iteration `iteration`'s training run (parameter init, batches, dropout)."""
    return seed * LOOP_SEED_STRIDE + iteration
