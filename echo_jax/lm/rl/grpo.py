"""GRPO (Shao et al. 2024, DeepSeekMath): no critic; each completion's advantage is its reward
normalised within the G samples of its prompt, given to every token of the completion, and the
KL to a frozen reference is a loss term (k3 by default), not a reward penalty.

Shape legend as in `common`: B rows = Q prompts x G samples (prompt-major), T tokens.

Variants by config: `advantage="dr_grpo"` drops the division by the group std and
`loss.aggregation="seq_mean_token_sum_norm"` normalises by a constant length (Dr. GRPO, Liu et al.
2025); `loss.eps_high > loss.eps_low` is DAPO's clip-higher (Yu et al. 2025).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from echo_jax.core.config import ConfigError
from echo_jax.core.train_state import TrainState
from echo_jax.lm.model import Transformer
from echo_jax.lm.rl import algorithm, common, policy_gradient
from echo_jax.lm.rl.algorithm import RLState
from echo_jax.lm.rl.common import OptimConfig, PolicyLossConfig, Rollout, RolloutConfig


@common.register("advantage", "grpo")
def grpo_advantages(r_QxG: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(r - mean) / (std + eps) within each prompt's group; std with Bessel's correction, as
    torch's default in the study's OpenRLHF. A group whose rewards are all equal gets 0."""
    centred = r_QxG - r_QxG.mean(-1, keepdims=True)
    return centred / (jnp.std(r_QxG, axis=-1, keepdims=True, ddof=1) + eps)


@common.register("advantage", "dr_grpo")
def dr_grpo_advantages(r_QxG: jax.Array) -> jax.Array:
    """r - mean within each group: Dr. GRPO (Liu et al. 2025) drops the std division, which
    up-weights prompts that are nearly always or nearly never solved."""
    return r_QxG - r_QxG.mean(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The study's GRPO runs (OpenRLHF `group_norm`, `use_kl_loss`, k3): see `RolloutConfig`
    for the sampling and batch sizes; actor lr 1e-6; KL coefficient 0, 1e-3 or 1e-2."""

    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-6))
    advantage: str = "grpo"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self):
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError("GRPO needs samples_per_prompt >= 2 to normalise within a group")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        common.get("advantage", self.advantage)
        common.get("kl", self.kl_estimator)

    @property
    def uses_reference(self) -> bool:
        """beta = 0 needs no reference model: its forward pass is skipped altogether."""
        return self.kl_coef > 0


def make_prepare_fn(model: Transformer, cfg: GRPOConfig) -> Callable:
    """`prepare(state, ref_params, prompts_BxP, prompt_lengths_B, completions_BxN,
    completion_lengths_B, rewards_B) -> (Rollout, metrics)`: old (and reference) log-probs by
    teacher forcing in micro-batches, and group advantages. `ref_params` must be None exactly when
    beta = 0. Metric `flat_groups`: share of prompts whose G rewards are all equal (no signal)."""
    advantage_fn = common.get("advantage", cfg.advantage)
    rc = cfg.rollout

    def prepare(
        state: TrainState | RLState,
        ref_params,
        prompts_BxP,
        prompt_lengths_B,
        completions_BxN,
        completion_lengths_B,
        rewards_B,
    ) -> tuple[Rollout, dict[str, jax.Array]]:
        if (ref_params is not None) != cfg.uses_reference:
            raise ValueError(
                f"ref_params must be given exactly when kl_coef > 0 (kl_coef={cfg.kl_coef})"
            )
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
        advantages_B = advantage_fn(r_QxG).reshape(-1)
        rollout = Rollout(
            tokens_BxT=tokens,
            positions_BxT=positions,
            segment_ids_BxT=segments,
            mask_BxT=mask,
            old_logp_BxT=old_logp,
            advantages_BxT=advantages_B[:, None] * mask,
            ref_logp_BxT=ref_logp,
        )
        flat = jnp.all(r_QxG == r_QxG[:, :1], axis=-1)
        return rollout, {"flat_groups": flat.mean()}

    return prepare


def make_loss_fn(model: Transformer, cfg: GRPOConfig) -> Callable:
    """`loss_fn(params, rollout) -> (loss_sum, stats)`: clipped surrogate + beta * KL per token."""
    return common.make_policy_loss_fn(
        model,
        cfg.loss,
        temperature=cfg.rollout.temperature,
        max_len=cfg.rollout.max_new_tokens,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
    )


def make_update_step(model: Transformer, tx: optax.GradientTransformation, cfg: GRPOConfig):
    """The pure `grpo_update_step(state, rollout_minibatch, rng) -> (state, metrics)`: one
    optimizer step on `train_batch_size` rows, gradients accumulated over micro-batches; metrics
    `loss`, `clip_fraction`, `entropy`, `kl` (only with a reference) and `grad_norm`."""
    loss_fn = make_loss_fn(model, cfg)

    def grpo_update_step(
        state: TrainState, minibatch: Rollout, rng: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        del rng  # the loss is deterministic given the rollout
        grads, stats = common.accumulate_gradients(
            loss_fn, state.params, minibatch, cfg.rollout.micro_batch_size
        )
        metrics = {**common.finish_stats(stats), "grad_norm": optax.tree.norm(grads)}
        return state.apply_gradients(grads, tx), metrics

    return grpo_update_step


@algorithm.register("grpo")
class GRPO(policy_gradient.PolicyGradient):
    """GRPO from the `rl` block: `advantage` ("grpo" or "dr_grpo"), `kl_coef`, `kl_estimator`,
    the clipped loss's `eps_low`/`eps_high`/`aggregation`, `lr` and its schedule."""

    def make_config(self, rl: ml_collections.ConfigDict) -> GRPOConfig:
        return GRPOConfig(
            rollout=self.rollout,
            loss=policy_gradient.loss_config(rl),
            optim=policy_gradient.optim_config(rl, rl.lr),
            advantage=rl.advantage,
            kl_coef=rl.kl_coef,
            kl_estimator=rl.kl_estimator,
        )

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return self.cfg.optim.make(self.num_updates)

    def make_prepare(self) -> Callable:
        return make_prepare_fn(self.model, self.cfg)

    def make_update(self) -> Callable:
        update = make_update_step(self.model, self.tx, self.cfg)

        def rl_update(state: RLState, minibatch: Rollout, rng: jax.Array):
            policy, metrics = update(state.policy, minibatch, rng)
            return state.with_policy(policy), metrics

        return rl_update

    def init_state(self, rng: jax.Array) -> RLState:
        return algorithm.init_policy_state(self, rng, self.tx)
