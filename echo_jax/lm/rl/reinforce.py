"""REINFORCE with a group baseline (`reinforce`: the study's OpenRLHF `reinforce_baseline`) and
RLOO (`rloo`, Ahmadian et al. 2024): no critic, as in GRPO, but the KL enters the reward as in PPO.

Per row b of prompt q: the sequence score is r_b - mean_q(r) (`reinforce_baseline`) or r_b minus
the mean of the other G - 1 rewards of its group (`rloo`); every completion token gets the reward
-kl_coef * k1 (policy at rollout time vs the frozen reference) and the last one also the score
(OpenRLHF's `compute_reward`); a token's advantage is the return from it to the end (gamma 1);
advantages are whitened over the whole rollout (OpenRLHF normalises every estimator's advantages
but `group_norm`'s). The loss is the clipped surrogate, without a KL term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from echo_jax.core.config import ConfigError
from echo_jax.lm.model import Transformer
from echo_jax.lm.rl import algorithm, common, grpo, policy_gradient, ppo
from echo_jax.lm.rl.algorithm import RLState
from echo_jax.lm.rl.common import OptimConfig, PolicyLossConfig, Rollout, RolloutConfig


@common.register("advantage", "reinforce_baseline")
def reinforce_baseline_scores(r_QxG: jax.Array) -> jax.Array:
    """r - the mean of its group (REINFORCE++-baseline as OpenRLHF computes it)."""
    return r_QxG - r_QxG.mean(-1, keepdims=True)


@common.register("advantage", "rloo")
def rloo_scores(r_QxG: jax.Array) -> jax.Array:
    """r - the mean of the other G - 1 rewards of its group (leave one out)."""
    G = r_QxG.shape[-1]
    return r_QxG - (r_QxG.sum(-1, keepdims=True) - r_QxG) / (G - 1)


def returns_to_go(rewards_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """sum_{t' >= t} reward_t' over each row's completion (gamma 1); 0 off the mask."""
    masked = rewards_BxT * mask_BxT
    return jnp.flip(jnp.cumsum(jnp.flip(masked, -1), -1), -1) * mask_BxT


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    """The study's `reinforce_baseline` runs: KL k1 in the reward with coefficient 0, 1e-3 or
    1e-2, actor lr 1e-6, the clipped surrogate (eps 0.2) over 8 updates per rollout."""

    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-6))
    baseline: str = "reinforce_baseline"  # or "rloo"
    kl_coef: float = 0.0
    kl_estimator: str = "k1"

    def __post_init__(self):
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError(f"{self.baseline} needs samples_per_prompt >= 2 for its baseline")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        common.get("advantage", self.baseline)
        common.get("kl", self.kl_estimator)

    @property
    def uses_reference(self) -> bool:
        """The reference scores the reward's KL penalty; with beta = 0 it is never run."""
        return self.kl_coef > 0


def make_prepare_fn(model: Transformer, cfg: ReinforceConfig) -> Callable:
    """`prepare(state, ref_params, prompts_BxP, prompt_lengths_B, completions_BxN,
    completion_lengths_B, rewards_B) -> (Rollout, metrics)` (module docstring); `ref_params` is
    given exactly when kl_coef > 0. Metrics: `flat_groups`, and `kl` with a reference."""
    score_fn, kl_fn = common.get("advantage", cfg.baseline), common.get("kl", cfg.kl_estimator)
    rc = cfg.rollout

    def prepare(
        state: RLState,
        ref_params,
        prompts_BxP,
        prompt_lengths_B,
        completions_BxN,
        completion_lengths_B,
        rewards_B,
    ) -> tuple[Rollout, dict[str, jax.Array]]:
        if (ref_params is not None) != cfg.uses_reference:
            raise ValueError(f"ref_params must be given exactly when kl_coef > 0 ({cfg.kl_coef})")
        tokens, positions, segments, mask = common.join_prompt_completion(
            prompts_BxP, prompt_lengths_B, completions_BxN, completion_lengths_B
        )

        def score(micro):
            logp = lambda p: common.sequence_logprobs(model, p, *micro, rc.temperature)[0]
            return logp(state.params), (None if ref_params is None else logp(ref_params))

        old_logp, ref_logp = common.map_micro_batches(
            score, (tokens, positions, segments), rc.micro_batch_size
        )
        r_QxG = rewards_B.reshape(rc.prompts_per_step, rc.samples_per_prompt).astype(jnp.float32)
        scores_B = score_fn(r_QxG).reshape(-1)
        kl_BxT = jnp.zeros_like(old_logp) if ref_logp is None else kl_fn(old_logp, ref_logp)
        rewards_BxT = ppo.token_rewards(scores_B, kl_BxT, mask, cfg.kl_coef)
        advantages = common.masked_whiten(returns_to_go(rewards_BxT, mask), mask)
        rollout = Rollout(
            tokens_BxT=tokens,
            positions_BxT=positions,
            segment_ids_BxT=segments,
            mask_BxT=mask,
            old_logp_BxT=old_logp,
            advantages_BxT=advantages,
            ref_logp_BxT=None,  # the KL is in the reward, not the loss
        )
        metrics = {"flat_groups": jnp.all(r_QxG == r_QxG[:, :1], axis=-1).mean()}
        if ref_logp is not None:
            metrics["kl"] = common.masked_mean(kl_BxT, mask)
        return rollout, metrics

    return prepare


class _Reinforce(grpo.GRPO):
    """REINFORCE-style estimators from the `rl` block: `kl_coef` (in the reward), `kl_estimator`
    (the study: k1), the clipped loss's `eps_low`/`eps_high`/`aggregation`, `lr`. The optimizer,
    the update step and the state are GRPO's: the rollout carries no reference log-probs, so the
    shared loss adds no KL term."""

    baseline: str

    def make_config(self, rl: ml_collections.ConfigDict) -> ReinforceConfig:
        return ReinforceConfig(
            rollout=self.rollout,
            loss=policy_gradient.loss_config(rl),
            optim=policy_gradient.optim_config(rl, rl.lr),
            baseline=self.baseline,
            kl_coef=rl.kl_coef,
            kl_estimator=rl.kl_estimator,
        )

    def make_prepare(self) -> Callable:
        return make_prepare_fn(self.model, self.cfg)


@algorithm.register("reinforce")
class Reinforce(_Reinforce):
    """The study's `reinforce_baseline`."""

    baseline = "reinforce_baseline"


@algorithm.register("rloo")
class RLOO(_Reinforce):
    """REINFORCE leave-one-out."""

    baseline = "rloo"
