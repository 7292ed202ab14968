"""What every RL algorithm provides, its registry, and the state all of them train.

An algorithm is one module that subclasses `Algorithm` and registers itself by name
(`@register("grpo")`); `configs/lm_rl.py` names it (`config.algo`) and `get(name)` builds it from
the config's `rl` block. Nothing else in the code branches on algorithm names.

One RL step of the training loop (`core.train_loop`) is:
1. host stage (`lm.jobs.rl`): sample a rollout with the current policy, grade it in the sandbox,
   and let the algorithm turn it into a numpy batch (`Algorithm.batch`);
2. the algorithm's pure `train_step(state, batch, rng)`, jitted by the loop: everything that
   follows from the rollout (log-probabilities, advantages, every optimizer update of the step).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from echo_jax.core.config import ConfigError
from echo_jax.core.train_state import TrainState
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import common
from echo_jax.lm.rl.common import RolloutConfig
from echo_jax.lm.rl.rollout import Sample

_ALGORITHMS: dict[str, type[Algorithm]] = {}


@flax.struct.dataclass
class RLState:
    """What an RL run trains and checkpoints. The policy's `params` sit at the top, where
    `restore.load_params` reads them (as in a pretraining `TrainState`); `step` counts the
    policy's optimizer updates; `critic` is PPO's value model (else None); `ref_params` the frozen
    initial policy (None when the run neither uses nor reports a KL to it)."""

    step: jax.Array
    params: Any
    opt_state: Any
    critic: TrainState | None = None
    ref_params: Any = None

    @property
    def policy(self) -> TrainState:
        return TrainState(step=self.step, params=self.params, opt_state=self.opt_state)

    def with_policy(self, policy: TrainState) -> RLState:
        return self.replace(step=policy.step, params=policy.params, opt_state=policy.opt_state)


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: makes the algorithm available as `get(name)`."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _ALGORITHMS:
            raise ValueError(f"RL algorithm {name!r} is already registered")
        _ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return decorator


def names() -> tuple[str, ...]:
    return tuple(sorted(_ALGORITHMS))


def get(name: str) -> type[Algorithm]:
    if name not in _ALGORITHMS:
        raise ConfigError(f"unknown RL algorithm {name!r}; valid: {', '.join(names())}")
    return _ALGORITHMS[name]


def init_policy_state(algo: Algorithm, rng: jax.Array, tx: optax.GradientTransformation) -> RLState:
    """A freshly initialised policy with `tx`'s optimizer state and, if the algorithm uses one,
    the reference (the same initial values: `warm_start` gives each its own buffers)."""
    policy = TrainState.create(algo.model.init(rng, *dummy_inputs())["params"], tx)
    return RLState(
        step=policy.step,
        params=policy.params,
        opt_state=policy.opt_state,
        ref_params=policy.params if algo.uses_reference else None,
    )


def dummy_inputs(length: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens, positions and segment ids of one row: enough to initialise a model."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return tokens, tokens, tokens + 1


class Algorithm(abc.ABC):
    """One RL algorithm: built from the `rl` block of `configs/lm_rl.py` for a run of `num_steps`
    RL steps (the learning-rate schedules span them), it defines the sampling (`rollout`), the
    state, the batch a graded rollout becomes, and the pure train step. Invalid settings raise
    ValueError."""

    name: str  # set by `register`
    rollout: RolloutConfig
    uses_reference: bool  # the state carries the frozen reference (in the loss, or reported)

    def __init__(
        self, rl: ml_collections.ConfigDict, model_cfg: ModelConfig, vocabulary: Any, num_steps: int
    ):
        self.model_cfg, self.model = model_cfg, Transformer(model_cfg)
        self.vocabulary, self.num_steps = vocabulary, num_steps

    @abc.abstractmethod
    def init_state(self, rng: jax.Array) -> RLState:
        """A freshly initialised state (boxed with logical axes; `warm_start` fills in the
        pretrained weights). Must be traceable: the loop jits it with the state's shardings."""

    def warm_start(self, state: RLState, pretrained: Any) -> RLState:
        """`state` with the pretrained policy (and, where used, the reference and what else starts
        from it); each gets its own buffers, since the train step donates the state."""
        copy = lambda: jax.tree.map(jnp.copy, pretrained)  # noqa: E731
        return state.replace(
            params=copy(), ref_params=copy() if state.ref_params is not None else None
        )

    @abc.abstractmethod
    def batch(
        self, sample: Sample, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The numpy batch of the train step from a graded rollout (rows first), and host-side
        metrics of its own."""

    @abc.abstractmethod
    def train_step(
        self, state: RLState, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[RLState, dict[str, jax.Array]]:
        """Pure: every update that follows from one rollout. Metrics include "loss"."""


def rollout_arrays(sample: Sample) -> dict[str, np.ndarray]:
    """The sampler's output with the rewards: what the policy-gradient train steps read."""
    return {
        "prompts_BxP": np.asarray(sample.prompts_BxP),
        "prompt_lengths_B": np.asarray(sample.prompt_lengths_B),
        "completions_BxN": np.asarray(sample.completions_BxN),
        "completion_lengths_B": np.asarray(sample.completion_lengths_B),
        "rewards_B": np.asarray(sample.info.rewards, np.float32),
    }


def epoch_minibatches(rng: jax.Array, rollout: RolloutConfig) -> jax.Array:
    """Row indices [updates, train_batch_size]: each epoch a fresh permutation of the rollout,
    cut into optimizer steps (epoch e draws with `fold_in(rng, e)`)."""
    orders = [
        jax.random.permutation(jax.random.fold_in(rng, e), rollout.rollout_size)
        for e in range(rollout.epochs)
    ]
    return jnp.concatenate(orders).reshape(-1, rollout.train_batch_size)


def scan_updates(
    update: Callable, state: Any, data: Any, rows_UxM: jax.Array, rng: jax.Array
) -> tuple[Any, dict[str, jax.Array]]:
    """Runs `update(state, minibatch, rng)` on `data[rows]` for each row set, in order, inside
    one `lax.scan`; returns the final state and each metric's mean over the updates (the
    largest for `*_max` metrics)."""

    def body(carry, xs):
        rows_M, key = xs
        carry, metrics = update(carry, jax.tree.map(lambda x: x[rows_M], data), key)
        return carry, metrics

    keys = jax.random.split(rng, rows_UxM.shape[0])
    state, metrics = jax.lax.scan(body, state, (rows_UxM, keys))
    reduce = lambda k: jnp.max if k.endswith("_max") else jnp.mean
    return state, {k: reduce(k)(m, axis=0) for k, m in metrics.items()}


def reference_kl(
    model: Transformer,
    rollout: RolloutConfig,
    kl_estimator: str,
    ref_params: Any,
    data: common.Rollout,
) -> jax.Array:
    """Token mean of the KL estimator (policy at rollout time || reference) over the completions:
    what is reported when the KL is not part of the loss."""
    inputs = (data.tokens_BxT, data.positions_BxT, data.segment_ids_BxT)
    ref_logp = common.map_micro_batches(
        lambda micro: common.sequence_logprobs(model, ref_params, *micro, rollout.temperature)[0],
        inputs,
        rollout.micro_batch_size,
    )
    kl = common.get("kl", kl_estimator)(data.old_logp_BxT, ref_logp)
    return common.masked_mean(kl, data.mask_BxT)
