"""What PPO, GRPO and Expert Iteration share: a function registry, KL estimators, masked
reductions, loss aggregation, teacher-forced log-probabilities, the `Rollout` pytree, the clipped
policy loss, micro-batched gradients and the optimizer.

Shape legend: B rollout rows (Q prompts x G samples, prompt-major), Q prompts, G samples per prompt,
P padded prompt length, N new tokens, T = P + N teacher-forced length, V vocabulary.

Token t of a row is scored by the logits at t - 1, so every per-token array (`logp_BxT`,
`mask_BxT`, ...) is aligned with `tokens_BxT` and column 0 is always 0 / masked. `mask_BxT` is 1 on
completion tokens (the actions, EOS included) and 0 on prompt and padding slots.

Losses return a *sum* and a *normaliser*: the caller divides the total sum by the total normaliser,
so micro-batches aggregate to exactly the full-batch loss (all but `token_mean_per_microbatch`,
the study's, which is a mean of micro-batch means by design).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from echo_jax.core.config import ConfigError
from echo_jax.lm import pretrain
from echo_jax.lm.model import Transformer

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: makes `fn` available as `get(kind, name)` (configs name their maths by string)."""

    def decorator(fn: Callable) -> Callable:
        table = _REGISTRY.setdefault(kind, {})
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return decorator


def get(kind: str, name: str) -> Callable:
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table)) or 'none'}")
    return table[name]


# --- KL estimators (Schulman 2020, "Approximating KL divergence"), per sampled token. ---
# With tokens sampled from the policy, all three estimate KL(policy || reference).


@register("kl", "k1")
def kl_k1(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
    """log(p / p_ref): unbiased, can be negative; the study's per-token PPO reward penalty."""
    return logp_BxT - ref_logp_BxT


@register("kl", "k2")
def kl_k2(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
    """1/2 log(p / p_ref)^2: >= 0, biased, low variance."""
    return 0.5 * jnp.square(logp_BxT - ref_logp_BxT)


@register("kl", "k3")
def kl_k3(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
    """r - log r - 1 with r = p_ref / p: >= 0 and unbiased; GRPO's KL loss (Shao et al. 2024)."""
    log_r = ref_logp_BxT - logp_BxT
    return jnp.exp(log_r) - log_r - 1.0


# --- Masked reductions and loss aggregation. ---


def masked_sum(x: jax.Array, mask: jax.Array, axis: Any = None) -> jax.Array:
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Any = None) -> jax.Array:
    """Mean over the masked entries; 0 where there are none."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (PPO advantage normalisation); 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, eps)) * mask


def _rows(mask_BxT: jax.Array) -> jax.Array:
    """Rows holding at least one completion token (all-padding rows do not count)."""
    return jnp.sum(jnp.any(mask_BxT > 0, axis=-1))


@register("aggregation", "token_mean")
def token_mean(loss_BxT: jax.Array, mask_BxT: jax.Array, max_len: int):
    """Every token weighs 1 / (completion tokens in the batch): a response's total weight grows
    with its length, so long responses dominate (DAPO's token-level loss, Yu et al. 2025)."""
    del max_len
    return masked_sum(loss_BxT, mask_BxT), jnp.sum(mask_BxT)


@register("aggregation", "seq_mean_token_mean")
def seq_mean_token_mean(loss_BxT: jax.Array, mask_BxT: jax.Array, max_len: int):
    """Token t of row b weighs 1 / (rows * |o_b|): every response weighs the same in total, so
    each token of a short response weighs more than one of a long response (GRPO as in Shao et
    al. 2024, and OpenRLHF without packing; Liu et al. 2025 show it favours long wrong answers)."""
    del max_len
    return jnp.sum(masked_mean(loss_BxT, mask_BxT, axis=-1)), _rows(mask_BxT)


@register("aggregation", "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_BxT: jax.Array, mask_BxT: jax.Array, max_len: int):
    """Every token weighs 1 / (rows * max_len), a constant: per-token weights equal, as in
    token_mean, but the normaliser does not depend on the sampled lengths (Dr. GRPO, Liu et al.
    2025)."""
    return masked_sum(loss_BxT, mask_BxT), _rows(mask_BxT) * max_len


@register("aggregation", "token_mean_per_microbatch")
def token_mean_per_microbatch(loss_BxT: jax.Array, mask_BxT: jax.Array, max_len: int):
    """The token mean of each micro-batch, averaged over the micro-batches of an update: the
    study's loss, whose OpenRLHF packs samples into micro-batches and averages per micro-batch.
    Unlike the others its value depends on how rows fall into micro-batches
    (`rl.micro_batch_size`): each micro-batch returns (its mean, 1)."""
    del max_len
    return masked_sum(loss_BxT, mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0), 1.0


# --- The policy loss. ---


@register("policy_loss", "clipped")
def clipped_policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    advantages_BxT: jax.Array,
    eps_low: float,
    eps_high: float,
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (Schulman et al.
    2017) with decoupled bounds (DAPO's clip-higher, Yu et al. 2025). Returns the per-token loss
    and where the clipped branch is active, i.e. where the token's gradient is zero."""
    ratio_BxT = jnp.exp(logp_BxT - old_logp_BxT)
    unclipped = ratio_BxT * advantages_BxT
    clipped = jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high) * advantages_BxT
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The clipped surrogate shared by PPO and GRPO. The study (OpenRLHF) used eps 0.2 on both
    sides and the per-sequence mean of per-token means."""

    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher: 0.28 with eps_low 0.2 (Yu et al. 2025)
    aggregation: str = "seq_mean_token_mean"
    policy_loss: str = "clipped"

    def __post_init__(self):
        if not 0 < self.eps_low < 1 or self.eps_high <= 0:
            raise ConfigError(f"need 0 < eps_low < 1 and eps_high > 0, got {self}")
        get("aggregation", self.aggregation)
        get("policy_loss", self.policy_loss)


# --- Rollouts. ---


@flax.struct.dataclass
class Rollout:
    """The device arrays the losses read, all [B, T] and aligned with `tokens_BxT`.

    `ref_logp_BxT` is None when no reference model is in use (GRPO with beta = 0, PPO where the
    KL penalty is already in the rewards): its absence is structural, so the loss traces without
    a KL term. `returns_BxT` / `old_values_BxT` are PPO's critic targets and are None otherwise.
    """

    tokens_BxT: jax.Array
    positions_BxT: jax.Array
    segment_ids_BxT: jax.Array
    mask_BxT: jax.Array
    old_logp_BxT: jax.Array
    advantages_BxT: jax.Array
    ref_logp_BxT: jax.Array | None = None
    returns_BxT: jax.Array | None = None
    old_values_BxT: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RolloutInfo:
    """The host side of a rollout, one entry per row: what graded it and what it said."""

    questions: tuple[str, ...]
    texts: tuple[str, ...]
    styles: tuple[str, ...]
    rewards: np.ndarray
    correct: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray  # ended on EOS (False: cut off by the token budget)


def join_prompt_completion(
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    completions_BxN: jax.Array,
    completion_lengths_B: jax.Array,
):
    """Each right-padded prompt followed directly by its completion, then padding, as (B, T)
    tokens, positions, segment ids (1 on real tokens) and the completion mask (float32)."""
    B, P = prompts_BxP.shape
    N = completions_BxN.shape[1]
    slot_BxT = jnp.broadcast_to(jnp.arange(P + N, dtype=jnp.int32), (B, P + N))
    start_Bx1 = prompt_lengths_B[:, None].astype(jnp.int32)
    in_prompt = slot_BxT < start_Bx1
    in_completion = ~in_prompt & (slot_BxT < start_Bx1 + completion_lengths_B[:, None])
    from_prompt = jnp.take_along_axis(prompts_BxP, jnp.minimum(slot_BxT, P - 1), axis=1)
    from_completion = jnp.take_along_axis(
        completions_BxN, jnp.clip(slot_BxT - start_Bx1, 0, N - 1), axis=1
    )
    tokens_BxT = jnp.where(in_prompt, from_prompt, jnp.where(in_completion, from_completion, 0))
    segment_ids_BxT = (in_prompt | in_completion).astype(jnp.int32)
    return (
        tokens_BxT.astype(jnp.int32),
        slot_BxT,
        segment_ids_BxT,
        in_completion.astype(jnp.float32),
    )


def sequence_logprobs(
    model: Transformer,
    params: Any,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log p(token_t | tokens_<t) under softmax(logits / temperature), and the
    entropy of that next-token distribution, both (B, T) with column 0 set to 0."""
    logits_BxTxV, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)
    logits = logits_BxTxV[:, :-1] / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    entropy = logz - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad(picked - logz), pad(entropy)


def make_policy_loss_fn(
    model: Transformer,
    loss: PolicyLossConfig,
    *,
    temperature: float,
    max_len: int,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
):
    """`loss_fn(params, rollout) -> (loss_sum, stats)`; stats hold sums (see `finish_stats`).

    Per token: the clipped surrogate, plus kl_coef * KL(policy || reference) when the rollout
    carries reference log-probs (GRPO's KL loss, Shao et al. 2024); aggregated by `loss`.
    """
    aggregate = get("aggregation", loss.aggregation)
    surrogate = get("policy_loss", loss.policy_loss)
    kl_fn = get("kl", kl_estimator)

    def loss_fn(params: Any, batch: Rollout) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp_BxT, entropy_BxT = sequence_logprobs(
            model, params, batch.tokens_BxT, batch.positions_BxT, batch.segment_ids_BxT, temperature
        )
        mask = batch.mask_BxT
        loss_BxT, clipped_BxT = surrogate(
            logp_BxT, batch.old_logp_BxT, batch.advantages_BxT, loss.eps_low, loss.eps_high
        )
        log_ratio_BxT = logp_BxT - batch.old_logp_BxT  # the policy vs the one that sampled
        stats = {
            "clip_fraction": masked_sum(clipped_BxT, mask),
            "entropy": masked_sum(entropy_BxT, mask),
            # KL(behaviour || policy), k3: (r - 1) - log r with r the importance ratio
            "approx_kl": masked_sum(jnp.expm1(log_ratio_BxT) - log_ratio_BxT, mask),
            "ratio_max": jnp.max(jnp.where(mask > 0, jnp.exp(log_ratio_BxT), 0.0)),
        }
        if batch.ref_logp_BxT is not None:
            kl_BxT = kl_fn(logp_BxT, batch.ref_logp_BxT)
            loss_BxT = loss_BxT + kl_coef * kl_BxT
            stats["kl"] = masked_sum(kl_BxT, mask)
        total, normaliser = aggregate(loss_BxT, mask, max_len)
        return total, {**stats, "loss": total, "normaliser": normaliser, "tokens": jnp.sum(mask)}

    return loss_fn


def combine_stats(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Two micro-batches' stats as one's: sums add, `*_max` entries take the larger."""
    return {k: (jnp.maximum if k.endswith("_max") else jnp.add)(a[k], b[k]) for k in a}


def finish_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed stats -> metrics: "loss" / normaliser, `*_max` entries as they are, every other
    entry / completion tokens."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    out = {
        k: v if k.endswith("_max") else v / tokens
        for k, v in stats.items()
        if k not in ("loss", "normaliser", "tokens")
    }
    out["loss"] = stats["loss"] / jnp.maximum(stats["normaliser"], 1e-9)
    return out


# --- Micro-batching and the optimizer. ---


def _split_micro(batch: Any, micro_batch_size: int) -> Any:
    """[B, ...] -> [B / m, m, ...] with strided micro-batches (row r in micro-batch r mod B / m).
    Every loss here is a sum over rows, so the grouping changes nothing but the summation order;
    striding keeps each micro-batch spread over the batch-sharded devices (a contiguous split would
    put a micro-batch on one device, and the SPMD partitioner then computes it everywhere)."""

    def split(x):
        if x.shape[0] % micro_batch_size:
            raise ValueError(
                f"batch of {x.shape[0]} rows is not divisible into micro-batches "
                f"of {micro_batch_size}"
            )
        x = x.reshape(micro_batch_size, x.shape[0] // micro_batch_size, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def _join_micro(x: jax.Array) -> jax.Array:
    """The inverse of `_split_micro` for one array: [B / m, m, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulate_gradients(
    loss_fn: Callable, params: Any, batch: Any, micro_batch_size: int
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of sum(loss sums) / sum(normalisers) over micro-batches of `batch`, one
    micro-batch in memory at a time; `loss_fn(params, micro) -> (loss_sum, stats)` where stats
    hold summed quantities including "normaliser". Returns (grads, summed stats)."""
    micro = _split_micro(batch, micro_batch_size)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first)
    )

    def body(carry, micro_batch):
        grads, stats = grad_fn(params, micro_batch)
        return (jax.tree.map(jnp.add, carry[0], grads), combine_stats(carry[1], stats)), None

    (grads, stats), _ = jax.lax.scan(body, zeros, micro)
    scale = 1.0 / jnp.maximum(stats["normaliser"], 1e-9)
    return jax.tree.map(lambda g: g * scale, grads), stats


def map_micro_batches(fn: Callable, batch: Any, micro_batch_size: int) -> Any:
    """`fn` applied to micro-batches of `batch` in sequence (bounded memory), outputs re-joined."""
    out = jax.lax.map(fn, _split_micro(batch, micro_batch_size))
    return jax.tree.map(_join_micro, out)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW as the study's OpenRLHF runs: betas (0.9, 0.95), no weight decay, global-norm clip
    1.0, linear warm-up over 3 % of the updates, cosine to 0.1 x lr."""

    lr: float
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"invalid optimizer config {self}")

    def make(self, num_updates: int) -> optax.GradientTransformation:
        """The optimizer for a run of `num_updates` optimizer steps (the schedule's length)."""
        if num_updates < 1:
            raise ValueError(f"num_updates must be >= 1, got {num_updates}")
        return pretrain.make_optimizer(
            types.SimpleNamespace(
                lr=self.lr,
                warmup_steps=math.ceil(self.warmup_ratio * num_updates),
                num_steps=num_updates,
                min_lr_ratio=self.min_lr_ratio,
                grad_clip=self.grad_clip,
                b1=self.b1,
                b2=self.b2,
                weight_decay=self.weight_decay,
            )
        )


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """One RL step samples `prompts_per_step` x `samples_per_prompt` completions, then takes
    `epochs` passes over them in optimizer steps of `train_batch_size` rows, each accumulated over
    micro-batches of `micro_batch_size` rows. Defaults: the study's OpenRLHF runs (64 x 8 at
    temperature 0.7, 1024 new tokens, 64 rows per update so 8 updates per rollout, one epoch)."""

    prompts_per_step: int = 64
    samples_per_prompt: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_prompt_len: int = 1024
    train_batch_size: int = 64
    micro_batch_size: int = 8
    epochs: int = 1

    def __post_init__(self):
        sizes = (
            self.prompts_per_step,
            self.samples_per_prompt,
            self.max_new_tokens,
            self.max_prompt_len,
            self.train_batch_size,
            self.micro_batch_size,
            self.epochs,
        )
        if min(sizes) < 1:
            raise ConfigError(f"every size must be >= 1: {self}")
        if self.rollout_size % self.train_batch_size:
            raise ConfigError(
                f"rollout of {self.rollout_size} rows is not divisible into "
                f"train batches of {self.train_batch_size}"
            )
        if self.train_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train_batch_size {self.train_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature > 0 and 0 < top_p <= 1: {self}")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def updates_per_step(self) -> int:
        return self.epochs * self.rollout_size // self.train_batch_size
