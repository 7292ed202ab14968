"""Expert Iteration: sample many completions per training question, keep the verified-correct
ones, drop duplicate (question, completion) pairs, fine-tune on them with the next-token loss on
the completion only, and repeat from the fine-tuned model.

The study's rounds over the whole prompt set are `echo_jax/lm/jobs/ei_rounds.py` (kind "lm_ei").
The algorithm registered here, `ei_online`, runs each RL step as one small round:
`prompts_per_step` x `samples_per_prompt` completions, then `epochs` passes of SFT over what was
kept, with one optimizer across steps (its schedule spans the most updates the run can take), so
it runs and checkpoints in the same loop as GRPO and PPO.

SFT examples have the pretraining layout (`encode(question + "\\n\\n") + encode(completion) +
[EOS]`, as `data.pipeline.Tokenize`), one per row, right-padded to `seq_len`. Unlike the study's
data loader, a final partial batch is kept and padded with empty rows: the loss is a sum over
target tokens divided by their count, so empty rows change nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from echo_jax.core.config import ConfigError
from echo_jax.core.train_state import TrainState
from echo_jax.lm import pretrain
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import algorithm, common, policy_gradient
from echo_jax.lm.rl.algorithm import RLState
from echo_jax.lm.rl.common import OptimConfig, RolloutConfig
from echo_jax.lm.rl.rollout import Sample

SFT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class EIConfig:
    """The study's EI: 64 samples per question at temperature 1.0, top-p 0.95, up to 2048 new
    tokens; SFT at lr 1e-4 for 2 epochs (`rollout.epochs`), batches of 256 rows
    (`rollout.train_batch_size`, micro 8), max length 1024 (`seq_len`)."""

    rollout: RolloutConfig = dataclasses.field(
        default_factory=lambda: RolloutConfig(
            samples_per_prompt=64,
            temperature=1.0,
            top_p=0.95,
            max_new_tokens=2048,
            train_batch_size=256,
            epochs=2,
        )
    )
    seq_len: int = 1024
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {self.seq_len}")

    @property
    def batches_per_epoch(self) -> int:
        """The most SFT batches one round can fill (every sample kept)."""
        return math.ceil(self.rollout.rollout_size / self.rollout.train_batch_size)


def select_expert_samples(
    prompt_keys: Sequence[Hashable], texts: Sequence[str], correct: Sequence[bool]
) -> list[int]:
    """Indices of the correct samples, keeping the first of each (prompt, text) pair."""
    seen, keep = set(), []
    for i, (key, text, ok) in enumerate(zip(prompt_keys, texts, correct, strict=True)):
        if ok and (key, text) not in seen:
            seen.add((key, text))
            keep.append(i)
    return keep


def sft_example(
    vocabulary: Any, question: str, completion: str, seq_len: int
) -> dict[str, np.ndarray]:
    """One row: inputs, targets, loss_mask (1 on completion tokens and the final EOS),
    segment_ids and positions, truncated / padded to `seq_len`."""
    prompt = list(vocabulary.encode(question + "\n\n"))
    tokens = np.asarray(
        prompt + list(vocabulary.encode(completion)) + [vocabulary.eos_id], np.int32
    )[: seq_len + 1]
    n = len(tokens) - 1
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.arange(seq_len, dtype=np.int32),
    }
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["loss_mask"][len(prompt) - 1 : n] = 1.0  # target j is token j + 1
    row["segment_ids"][:n] = 1
    return row


def sft_batches(
    rows: Sequence[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """One shuffled epoch of [batch_size, seq_len] batches; the last is padded with empty rows."""
    order = rng.permutation(len(rows))
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        chunk += [empty] * (batch_size - len(chunk))
        yield {k: np.stack([r[k] for r in chunk]) for k in empty}


def make_sft_step(model: Transformer, tx: optax.GradientTransformation, micro_batch_size: int):
    """The pure `sft_step(state, batch, rng) -> (state, metrics)`: next-token loss on the
    completion tokens (`pretrain.token_nll`), a token mean over the whole batch."""

    def loss_fn(params, batch):
        nll_BxL, mask_BxL = pretrain.token_nll(model, params, batch)
        total = jnp.sum(nll_BxL * mask_BxL)
        return total, {"loss": total, "normaliser": jnp.sum(mask_BxL)}

    def sft_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        del rng  # deterministic given the batch
        grads, stats = common.accumulate_gradients(loss_fn, state.params, batch, micro_batch_size)
        metrics = {
            "loss": stats["loss"] / jnp.maximum(stats["normaliser"], 1.0),
            "grad_norm": optax.tree.norm(grads),
            "target_tokens": stats["normaliser"],
        }
        return state.apply_gradients(grads, tx), metrics

    return sft_step


def sft_epochs(
    rows: Sequence[dict[str, np.ndarray]], cfg: EIConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`cfg.rollout.epochs` shuffled epochs of `rows` as fixed-shape arrays [batch, U, seq_len]
    (U = epochs x `cfg.batches_per_epoch`; batch-major so the loop can shard the rows): batch u
    is `[:, u]`, and batches past an epoch's end are empty (loss mask 0)."""
    rc = cfg.rollout
    empty = {
        k: np.zeros(cfg.seq_len, np.int32 if k != "loss_mask" else np.float32) for k in SFT_KEYS
    }
    batches = []
    for _ in range(rc.epochs):
        epoch = list(sft_batches(rows, rc.train_batch_size, rng)) if rows else []
        fill = {k: np.stack([v] * rc.train_batch_size) for k, v in empty.items()}
        batches += epoch + [fill] * (cfg.batches_per_epoch - len(epoch))
    return {k: np.stack([b[k] for b in batches], axis=1) for k in SFT_KEYS}


@algorithm.register("ei_online")
class ExpertIteration(algorithm.Algorithm):
    """EI from the `rl` block: the sampling and batch sizes as the other algorithms' (`epochs` are
    SFT epochs over the kept samples, `train_batch_size` the SFT batch), `lr` and its schedule,
    and the SFT length `max_prompt_len + max_new_tokens`. EI has no KL term (`kl_coef` must be 0);
    with `log_kl` the KL to the initial policy is reported."""

    def __init__(
        self, rl: ml_collections.ConfigDict, model_cfg: ModelConfig, vocabulary: Any, num_steps: int
    ):
        super().__init__(rl, model_cfg, vocabulary, num_steps)
        if rl.kl_coef:
            raise ConfigError("Expert Iteration has no KL term: set rl.kl_coef=0")
        self.rollout = policy_gradient.rollout_config(rl)
        self.cfg = EIConfig(
            rollout=self.rollout,
            seq_len=rl.max_prompt_len + rl.max_new_tokens,
            optim=policy_gradient.optim_config(rl, rl.lr),
        )
        self.uses_reference = bool(rl.log_kl)
        self._sft = make_sft_step(self.model, self.tx, self.rollout.micro_batch_size)

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        updates = self.num_steps * self.rollout.epochs * self.cfg.batches_per_epoch
        return self.cfg.optim.make(updates)

    def init_state(self, rng: jax.Array) -> RLState:
        return algorithm.init_policy_state(self, rng, self.tx)

    def batch(
        self, sample: Sample, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The rollout's arrays (for the policy's entropy and KL) and the SFT batches of the
        correct unique samples; host metric `kept`."""
        info = sample.info
        keep = select_expert_samples(info.questions, info.texts, info.correct)
        rows = [
            sft_example(self.vocabulary, info.questions[i], info.texts[i], self.cfg.seq_len)
            for i in keep
        ]
        sft = sft_epochs(rows, self.cfg, rng)
        return (
            {**algorithm.rollout_arrays(sample), **{f"sft/{k}": v for k, v in sft.items()}},
            {"kept": float(len(keep))},
        )

    def _policy_stats(self, state: RLState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Entropy of the sampling policy on its completions and, with a reference, k3 KL."""
        tokens, positions, segments, mask = common.join_prompt_completion(
            batch["prompts_BxP"],
            batch["prompt_lengths_B"],
            batch["completions_BxN"],
            batch["completion_lengths_B"],
        )
        temperature = self.rollout.temperature

        def score(micro):
            logp, entropy = common.sequence_logprobs(self.model, state.params, *micro, temperature)
            if state.ref_params is None:
                return entropy, None
            ref_logp = common.sequence_logprobs(self.model, state.ref_params, *micro, temperature)[
                0
            ]
            return entropy, common.kl_k3(logp, ref_logp)

        entropy, kl = common.map_micro_batches(
            score, (tokens, positions, segments), self.rollout.micro_batch_size
        )
        out = {"entropy": common.masked_mean(entropy, mask)}
        if kl is not None:
            out["kl"] = common.masked_mean(kl, mask)
        return out

    def train_step(
        self, state: RLState, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[RLState, dict[str, jax.Array]]:
        """The policy's stats, then an SFT step on each non-empty batch (empty ones are skipped,
        so the optimizer sees only real updates). `loss`/`grad_norm`: means over the updates made
        (0 when nothing was kept)."""
        stats = self._policy_stats(state, batch)
        sft_UxBxL = {k: jnp.swapaxes(batch[f"sft/{k}"], 0, 1) for k in SFT_KEYS}
        skipped = jax.eval_shape(
            self._sft, state.policy, jax.tree.map(lambda x: x[0], sft_UxBxL), rng
        )[1]

        def body(policy: TrainState, sft_batch):
            nonempty = jnp.sum(sft_batch["loss_mask"]) > 0
            policy, metrics = jax.lax.cond(
                nonempty,
                lambda p: self._sft(p, sft_batch, rng),
                lambda p: (p, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), skipped)),
                policy,
            )
            return policy, (metrics, nonempty)

        policy, (metrics, nonempty_U) = jax.lax.scan(body, state.policy, sft_UxBxL)
        updates = jnp.maximum(jnp.sum(nonempty_U), 1)
        mean = lambda m: jnp.sum(jnp.where(nonempty_U, m, 0.0)) / updates  # noqa: E731
        return state.with_policy(policy), {
            **stats,
            "loss": mean(metrics["loss"]),
            "grad_norm": mean(metrics["grad_norm"]),
        }
