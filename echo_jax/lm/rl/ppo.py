"""PPO (Schulman et al. 2017) for language models, as the study ran it with OpenRLHF: a critic,
GAE (Schulman et al. 2016) over the completion tokens, value clipping, advantage whitening over the
rollout, and the KL to the reference folded into the per-token reward (k1 estimator): the reward
is -beta * k1 at every completion token plus the verifier's score at the last one.

Shape legend as in `common`: B rows, T tokens, L model input length, D d_model.

The critic is a separate `ValueModel`: a Transformer trunk with a scalar head whose trunk starts
from the policy's weights (OpenRLHF initialises the critic from the pretrained model). A head on
the policy's own trunk would need `Transformer.__call__` to also return its final normed hidden
states (e.g. a `return_hidden=True` flag); model.py does not offer that yet.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from echo_jax.core.config import ConfigError
from echo_jax.core.train_state import TrainState
from echo_jax.lm.model import Block, ModelConfig, Norm, Transformer
from echo_jax.lm.rl import algorithm, common, policy_gradient
from echo_jax.lm.rl.algorithm import RLState
from echo_jax.lm.rl.common import OptimConfig, PolicyLossConfig, Rollout, RolloutConfig


class ValueModel(nn.Module):
    """`__call__(tokens, positions, segment_ids) -> values_BxL` (float32), the value of the
    prefix ending at each position. Parameter names match `Transformer`'s, so the trunk can be
    copied from the policy (`critic_params_from_policy`). The head starts at zero, or with
    `head_std` > 0 drawn from N(0, head_std^2) (the study's OpenRLHF: std 1 / (d_model + 1))."""

    cfg: ModelConfig
    head_std: float = 0.0

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL):
        cfg = self.cfg
        init = nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")
        )
        embedding = self.param("embedding", init, (cfg.vocab_size, cfg.d_model), jnp.float32)
        x_BxLxD = jnp.take(embedding, tokens_BxL, axis=0).astype(jnp.dtype(cfg.dtype))
        block = nn.remat(Block) if cfg.remat else Block
        for i in range(cfg.n_layers):
            x_BxLxD, _ = block(cfg, name=f"block_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL)
        x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
        head = self.param(
            "value_head",
            nn.with_logical_partitioning(
                nn.initializers.normal(self.head_std) if self.head_std else nn.initializers.zeros,
                ("embed",),
            ),
            (cfg.d_model,),
            jnp.float32,
        )
        return jnp.einsum("BLD,D->BL", x_BxLxD.astype(jnp.float32), head)


def critic_params_from_policy(policy_params: Any, critic_params: Any) -> Any:
    """The critic's parameters with every trunk weight copied from the policy."""
    return {k: jax.tree.map(jnp.array, policy_params.get(k, v)) for k, v in critic_params.items()}


def token_values(
    critic: ValueModel, params: Any, tokens_BxT, positions_BxT, segment_ids_BxT
) -> jax.Array:
    """V of the state in which token t is chosen (the prefix before it), aligned like `logp_BxT`."""
    values_BxT = critic.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)
    return jnp.pad(values_BxT[:, :-1], ((0, 0), (1, 0)))


def token_rewards(
    scores_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array, kl_coef: float
) -> jax.Array:
    """-kl_coef * kl on every completion token, plus the score on each row's last one (as
    OpenRLHF's `compute_reward`)."""
    T = mask_BxT.shape[1]
    last_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1] > 0, axis=1)
    has_tokens_B = jnp.any(mask_BxT > 0, axis=1)
    final_BxT = jax.nn.one_hot(last_B, T) * jnp.where(has_tokens_B, scores_B, 0.0)[:, None]
    return (final_BxT - kl_coef * kl_BxT) * mask_BxT


def gae(
    rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016) as a reverse `lax.scan` over T.

    Each row's episode is its masked (completion) span; the state after its last token is
    terminal (value 0). A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t.
    Returns (advantages, returns = advantages + values), both 0 off the mask.
    """
    m = mask_BxT.astype(jnp.float32)
    v = values_BxT * m
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))
    delta_BxT = rewards_BxT * m + gamma * shift(v) - v

    def step(next_advantage_B, xs):
        delta_B, next_mask_B = xs
        advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B
        return advantage_B, advantage_B

    _, advantages_TxB = jax.lax.scan(
        step, jnp.zeros(m.shape[0]), (delta_BxT.T, shift(m).T), reverse=True
    )
    advantages_BxT = advantages_TxB.T * m
    return advantages_BxT, advantages_BxT + v


def clipped_value_loss(
    values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array, clip: float
) -> jax.Array:
    """1/2 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c): the critic
    cannot gain by moving further than c from its rollout-time value (PPO2 / OpenRLHF)."""
    clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    return 0.5 * jnp.maximum(
        jnp.square(values_BxT - returns_BxT), jnp.square(clipped - returns_BxT)
    )


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The study's PPO runs (OpenRLHF `gae`, k1 in the reward): gamma 1, lambda 0.95, clip 0.2,
    value clip 0.2, actor lr 1e-6, critic lr 7e-6, advantages whitened over the rollout; KL
    coefficient 0, 1e-3 or 1e-2."""

    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    actor_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-6))
    critic_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=7e-6))
    kl_coef: float = 0.0
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    whiten_advantages: bool = True

    def __post_init__(self):
        if self.kl_coef < 0 or self.value_clip <= 0:
            raise ConfigError(f"need kl_coef >= 0 and value_clip > 0: {self}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must lie in [0, 1]: {self}")
        common.get("kl", self.kl_estimator)

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def make_prepare_fn(model: Transformer, critic: ValueModel, cfg: PPOConfig) -> Callable:
    """`prepare(state, ref_params, prompts_BxP, prompt_lengths_B, completions_BxN,
    completion_lengths_B, scores_B) -> (Rollout, metrics)`: old log-probs, values and (if
    beta > 0) the reference in micro-batches; KL-penalised token rewards; GAE; whitening. Metrics:
    `value_mean`, and `kl` (rollout-time token mean of the estimator) with a reference."""
    kl_fn = common.get("kl", cfg.kl_estimator)
    rc = cfg.rollout

    def prepare(
        state: RLState,
        ref_params,
        prompts_BxP,
        prompt_lengths_B,
        completions_BxN,
        completion_lengths_B,
        scores_B,
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
            old_logp = logp(state.params)
            kl = (
                jnp.zeros_like(old_logp)
                if ref_params is None
                else kl_fn(old_logp, logp(ref_params))
            )
            return old_logp, kl, token_values(critic, state.critic.params, *micro)

        old_logp, kl, values = common.map_micro_batches(
            score, (tokens, positions, segments), rc.micro_batch_size
        )
        rewards = token_rewards(scores_B.astype(jnp.float32), kl, mask, cfg.kl_coef)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = common.masked_whiten(advantages, mask)
        rollout = Rollout(
            tokens_BxT=tokens,
            positions_BxT=positions,
            segment_ids_BxT=segments,
            mask_BxT=mask,
            old_logp_BxT=old_logp,
            advantages_BxT=advantages,
            returns_BxT=returns,
            old_values_BxT=values * mask,
        )
        metrics = {"value_mean": common.masked_mean(values, mask)}
        if ref_params is not None:
            metrics["kl"] = common.masked_mean(kl, mask)
        return rollout, metrics

    return prepare


def make_value_loss_fn(critic: ValueModel, cfg: PPOConfig) -> Callable:
    """`loss_fn(critic_params, rollout) -> (loss_sum, stats)`, aggregated like the policy loss."""
    aggregate = common.get("aggregation", cfg.loss.aggregation)

    def loss_fn(params, batch: Rollout):
        values = token_values(
            critic, params, batch.tokens_BxT, batch.positions_BxT, batch.segment_ids_BxT
        )
        loss_BxT = clipped_value_loss(
            values, batch.old_values_BxT, batch.returns_BxT, cfg.value_clip
        )
        total, normaliser = aggregate(loss_BxT, batch.mask_BxT, cfg.rollout.max_new_tokens)
        return total, {"loss": total, "normaliser": normaliser}

    return loss_fn


def make_update_step(
    model: Transformer,
    critic: ValueModel,
    actor_tx: optax.GradientTransformation,
    critic_tx: optax.GradientTransformation,
    cfg: PPOConfig,
):
    """The pure `ppo_update_step(state, rollout_minibatch, rng) -> (state, metrics)`: one actor
    and one critic optimizer step on the same minibatch (the KL is in the rewards, so the policy
    loss has no KL term)."""
    actor_loss = common.make_policy_loss_fn(
        model, cfg.loss, temperature=cfg.rollout.temperature, max_len=cfg.rollout.max_new_tokens
    )
    value_loss = make_value_loss_fn(critic, cfg)
    micro = cfg.rollout.micro_batch_size

    def ppo_update_step(
        state: RLState, minibatch: Rollout, rng: jax.Array
    ) -> tuple[RLState, dict[str, jax.Array]]:
        del rng  # the losses are deterministic given the rollout
        actor_grads, actor_stats = common.accumulate_gradients(
            actor_loss, state.params, minibatch, micro
        )
        critic_grads, critic_stats = common.accumulate_gradients(
            value_loss, state.critic.params, minibatch, micro
        )
        metrics = {
            **common.finish_stats(actor_stats),
            "value_loss": critic_stats["loss"] / jnp.maximum(critic_stats["normaliser"], 1e-9),
            "grad_norm": optax.tree.norm(actor_grads),
            "critic_grad_norm": optax.tree.norm(critic_grads),
        }
        new_state = state.with_policy(state.policy.apply_gradients(actor_grads, actor_tx))
        return new_state.replace(
            critic=state.critic.apply_gradients(critic_grads, critic_tx)
        ), metrics

    return ppo_update_step


@algorithm.register("ppo")
class PPO(policy_gradient.PolicyGradient):
    """PPO from the `rl` block: the policy loss's settings as GRPO's, plus `critic_lr`, `gamma`,
    `lam`, `value_clip`; the KL (`kl_coef`, `kl_estimator`) is a per-token reward penalty."""

    def make_config(self, rl: ml_collections.ConfigDict) -> PPOConfig:
        if rl.value_head_init not in ("zero", "study"):
            raise ConfigError(
                f"rl.value_head_init must be 'zero' or 'study', got {rl.value_head_init!r}"
            )
        self.value_head_init = rl.value_head_init
        return PPOConfig(
            rollout=self.rollout,
            loss=policy_gradient.loss_config(rl),
            actor_optim=policy_gradient.optim_config(rl, rl.lr),
            critic_optim=policy_gradient.optim_config(rl, rl.critic_lr),
            kl_coef=rl.kl_coef,
            kl_estimator=rl.kl_estimator,
            gamma=rl.gamma,
            lam=rl.lam,
            value_clip=rl.value_clip,
        )

    @functools.cached_property
    def critic(self) -> ValueModel:
        std = 1.0 / (self.model_cfg.d_model + 1) if self.value_head_init == "study" else 0.0
        return ValueModel(self.model_cfg, head_std=std)

    @functools.cached_property
    def actor_tx(self) -> optax.GradientTransformation:
        return self.cfg.actor_optim.make(self.num_updates)

    @functools.cached_property
    def critic_tx(self) -> optax.GradientTransformation:
        return self.cfg.critic_optim.make(self.num_updates)

    def make_prepare(self) -> Callable:
        return make_prepare_fn(self.model, self.critic, self.cfg)

    def make_update(self) -> Callable:
        return make_update_step(self.model, self.critic, self.actor_tx, self.critic_tx, self.cfg)

    def init_state(self, rng: jax.Array) -> RLState:
        policy_rng, critic_rng = jax.random.split(rng)
        critic_params = self.critic.init(critic_rng, *algorithm.dummy_inputs())["params"]
        return algorithm.init_policy_state(self, policy_rng, self.actor_tx).replace(
            critic=TrainState.create(critic_params, self.critic_tx)
        )

    def warm_start(self, state: RLState, pretrained: Any) -> RLState:
        """The policy (and reference) as every algorithm's; the critic's trunk from the
        pretrained policy too, its value head as initialised (OpenRLHF)."""
        state = super().warm_start(state, pretrained)
        critic = critic_params_from_policy(pretrained, state.critic.params)
        return state.replace(critic=state.critic.replace(params=critic))
