"""The structure GRPO and PPO share: a rollout of prompts x samples, teacher-forced old (and
reference) log-probabilities, advantages, then `epochs` passes of optimizer updates over
minibatches of `train_batch_size` rows, all inside one pure train step.

A subclass supplies `make_prepare` (old log-probs, values, advantages: `common.Rollout`) and
`make_update` (one optimizer step on a minibatch).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from echo_jax.lm.model import ModelConfig
from echo_jax.lm.rl import algorithm, common
from echo_jax.lm.rl.algorithm import RLState
from echo_jax.lm.rl.rollout import Sample


def rollout_config(rl: ml_collections.ConfigDict) -> common.RolloutConfig:
    return common.RolloutConfig(
        prompts_per_step=rl.prompts_per_step,
        samples_per_prompt=rl.samples_per_prompt,
        temperature=rl.temperature,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        max_prompt_len=rl.max_prompt_len,
        train_batch_size=rl.train_batch_size,
        micro_batch_size=rl.micro_batch_size,
        epochs=rl.epochs,
    )


def loss_config(rl: ml_collections.ConfigDict) -> common.PolicyLossConfig:
    return common.PolicyLossConfig(
        eps_low=rl.eps_low, eps_high=rl.eps_high, aggregation=rl.aggregation
    )


def optim_config(rl: ml_collections.ConfigDict, lr: float) -> common.OptimConfig:
    return common.OptimConfig(lr=lr, warmup_ratio=rl.warmup_ratio, min_lr_ratio=rl.min_lr_ratio)


class PolicyGradient(algorithm.Algorithm):
    """`cfg` is the algorithm's dataclass (`rollout`, `kl_coef`, `kl_estimator`, `uses_reference`);
    with `rl.log_kl` the KL to the initial policy is reported even when it is not in the loss."""

    cfg: Any

    def __init__(
        self, rl: ml_collections.ConfigDict, model_cfg: ModelConfig, vocabulary: Any, num_steps: int
    ):
        super().__init__(rl, model_cfg, vocabulary, num_steps)
        self.rollout = rollout_config(rl)
        self.num_updates = num_steps * self.rollout.updates_per_step
        self.cfg = self.make_config(rl)
        self.kl_in_loss = self.cfg.uses_reference
        self.uses_reference = self.kl_in_loss or rl.log_kl
        self.overlong_filter = rl.overlong_filter
        self._prepare, self._update = self.make_prepare(), self.make_update()

    @abc.abstractmethod
    def make_config(self, rl: ml_collections.ConfigDict) -> Any:
        """The algorithm's validated dataclass from the `rl` block (ValueError if invalid)."""

    @abc.abstractmethod
    def make_prepare(self) -> Callable:
        """`(state, ref_params or None, *rollout arrays) -> (common.Rollout, metrics)`."""

    @abc.abstractmethod
    def make_update(self) -> Callable:
        """`(RLState, minibatch Rollout, rng) -> (RLState, metrics)`: one optimizer step."""

    def batch(
        self, sample: Sample, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        del rng  # the train step shuffles on the device
        arrays = algorithm.rollout_arrays(sample)
        if not self.overlong_filter:
            return arrays, {}
        # DAPO's overlong filtering: a completion the token budget cut off adds nothing to the
        # loss (no completion tokens); its reward still counts in its group's baseline
        cut = ~np.asarray(sample.info.stopped)
        arrays["completion_lengths_B"] = np.where(cut, 0, arrays["completion_lengths_B"])
        return arrays, {"overlong_filtered": float(cut.mean())}

    def train_step(
        self, state: RLState, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[RLState, dict[str, jax.Array]]:
        in_loss = state.ref_params if self.kl_in_loss else None
        data, metrics = self._prepare(
            state,
            in_loss,
            batch["prompts_BxP"],
            batch["prompt_lengths_B"],
            batch["completions_BxN"],
            batch["completion_lengths_B"],
            batch["rewards_B"],
        )
        rows_UxM = algorithm.epoch_minibatches(rng, self.rollout)
        state, update_metrics = algorithm.scan_updates(
            self._update, state, data, rows_UxM, jax.random.fold_in(rng, self.rollout.epochs)
        )
        if state.ref_params is not None and in_loss is None:
            metrics["kl"] = algorithm.reference_kl(
                self.model, self.rollout, self.cfg.kl_estimator, state.ref_params, data
            )
        return state, {**update_metrics, **metrics}
