"""The RL step: rollout (sampler) -> reward (grading, on the host) -> advantages -> updates.

Host work (prompt encoding, decoding, grading in the sandbox) is kept apart from device work
(sampling, teacher-forced scoring, updates). Every shape is fixed by the config (prompts are padded
to `max_prompt_len`, completions to `max_new_tokens`, minibatches are gathered on the device from
a permutation), so nothing recompiles between steps.

`RLTrainer(algo, cfg, model_cfg, vocabulary, total_steps=...)` builds the jitted pieces once;
`run_rl_steps(trainer, state, ref_params, problems, num_steps, rng)` runs steps and returns one
metrics row per step: `reward_mean`, `accuracy`, `style_share/<style>`, `style_accuracy/<style>`
(styles present in the rollout), `response_length`, `loss`, `entropy`, `clip_fraction`,
`grad_norm`, `kl` (when reference parameters are given), `value_loss` / `value_mean` (PPO),
`flat_groups` (GRPO) and `time/rollout`, `time/reward`, `time/update` (seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from echo_jax.lm import grading
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import common, grpo, ppo
from echo_jax.lm.rl.common import Rollout, RolloutInfo
from echo_jax.lm.sampler import Sampler, SamplingParams, pad_prompts

ALGORITHMS = ("grpo", "ppo")


def encode_prompts(questions: Sequence[str], vocabulary: Any,
                   max_prompt_len: int) -> list[list[int]]:
    """`question + "\\n\\n"`, the pretraining layout without the solution (no chat template)."""
    prompts = [list(vocabulary.encode(q + "\n\n")) for q in questions]
    longest = max(len(p) for p in prompts)
    if longest > max_prompt_len:
        raise ValueError(f"a prompt has {longest} tokens > max_prompt_len {max_prompt_len}")
    return prompts


def decode_completions(tokens_BxN: np.ndarray, lengths_B: np.ndarray,
                       vocabulary: Any) -> list[str]:
    """Text of each completion (the vocabulary drops EOS and everything after it)."""
    return [vocabulary.decode(row[:n].tolist()) for row, n in zip(tokens_BxN, lengths_B)]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One graded rollout: device-side prompts and sampler output, host-side `RolloutInfo`."""

    prompts_BxP: np.ndarray
    prompt_lengths_B: np.ndarray
    completions_BxN: jax.Array
    completion_lengths_B: jax.Array
    info: RolloutInfo
    seconds_sampling: float
    seconds_grading: float


def sample_and_grade(sampler: Sampler, params: Any, problems: Sequence[dict], vocabulary: Any,
                     sampling: SamplingParams, samples_per_prompt: int, max_prompt_len: int,
                     rng: jax.Array, *, dataset: str, grade_timeout_s: float = 2.0,
                     rows_per_call: int = 0) -> Sample:
    """Samples `samples_per_prompt` completions of each problem ({"question", "answer"}; rows
    are prompt-major) and grades them: reward 1 if the extracted answer is correct, else 0.
    `rows_per_call` > 0 samples that many rows at a time, so the KV cache does not grow with
    the rollout (it must divide the rows)."""
    start = time.perf_counter()
    repeat = lambda xs: [x for x in xs for _ in range(samples_per_prompt)]
    questions = repeat([p["question"] for p in problems])
    prompts = encode_prompts([p["question"] for p in problems], vocabulary, max_prompt_len)
    prompts_BxP, prompt_lengths_B = pad_prompts(repeat(prompts), length_multiple=max_prompt_len)
    rows = len(prompts_BxP)
    chunk = rows_per_call or rows
    if rows % chunk:
        raise ValueError(f"rows_per_call {chunk} does not divide the {rows} rows of a rollout")
    outs = [sampler(params, prompts_BxP[i:i + chunk], prompt_lengths_B[i:i + chunk],
                    rng if chunk == rows else jax.random.fold_in(rng, i), sampling)
            for i in range(0, rows, chunk)]
    out = jax.tree.map(lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0], *outs)
    tokens_BxN, lengths_B = jax.device_get((out.tokens_BxN, out.lengths_B))
    sampled = time.perf_counter()
    texts = decode_completions(tokens_BxN, lengths_B, vocabulary)
    refs = repeat([str(p["answer"]) for p in problems])
    graded = grading.grade_batch(texts, refs, dataset=dataset, timeout_s=grade_timeout_s)
    info = RolloutInfo(
        questions=tuple(questions), texts=tuple(texts), styles=tuple(g.style for g in graded),
        rewards=np.array([g.reward for g in graded], np.float32),
        correct=np.array([g.correct for g in graded]), lengths=np.asarray(lengths_B))
    return Sample(prompts_BxP, prompt_lengths_B, out.tokens_BxN, out.lengths_B, info,
                  sampled - start, time.perf_counter() - sampled)


def _columns(info: RolloutInfo) -> list:
    return [getattr(info, f.name) for f in dataclasses.fields(info)]


def truncate_info(info: RolloutInfo, rows: int) -> RolloutInfo:
    return RolloutInfo(*(column[:rows] for column in _columns(info)))


def concat_infos(infos: Sequence[RolloutInfo]) -> RolloutInfo:
    columns = zip(*(_columns(i) for i in infos))
    return RolloutInfo(*(np.concatenate(c) if isinstance(c[0], np.ndarray) else sum(c, ())
                         for c in columns))


def rollout_metrics(info: RolloutInfo) -> dict[str, float]:
    """Reward, accuracy, response length and, per style label, its share and accuracy."""
    styles = np.asarray(info.styles)
    out = {"reward_mean": float(info.rewards.mean()), "accuracy": float(info.correct.mean()),
           "response_length": float(info.lengths.mean())}
    for style in grading.STYLE_LABELS:
        rows = styles == style
        out[f"style_share/{style}"] = float(rows.mean())
        if rows.any():
            out[f"style_accuracy/{style}"] = float(info.correct[rows].mean())
    return out


class RLTrainer:
    """The jitted rollout preparation and update step of one algorithm, built once.

    `total_steps` (RL steps) sets the length of the learning-rate schedules. The state is a
    `pretrain.TrainState` for GRPO and a `ppo.PPOState` for PPO (`init_state` builds either);
    `ref_params` (the frozen initial policy) is required when `cfg.kl_coef > 0`; given with
    kl_coef = 0 it only measures the KL (one more forward pass), which is then not in the loss.
    With a `mesh` the sampler splits the rollout over its data axes (`rules` map the model's);
    `sampler_rows` > 0 samples the rollout that many rows at a time (bounded KV-cache memory).
    """

    def __init__(self, algo: str, cfg: grpo.GRPOConfig | ppo.PPOConfig, model_cfg: ModelConfig,
                 vocabulary: Any, *, total_steps: int, dataset: str = "synthetic",
                 grade_timeout_s: float = 2.0, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = (), sampler_rows: int = 0):
        expected = {"grpo": grpo.GRPOConfig, "ppo": ppo.PPOConfig}.get(algo)
        if expected is None or not isinstance(cfg, expected):
            raise ValueError(f"algo must be one of {ALGORITHMS} with its config, got {algo!r} "
                             f"and {type(cfg).__name__}")
        self.algo, self.cfg, self.model_cfg, self.vocabulary = algo, cfg, model_cfg, vocabulary
        self.dataset, self.grade_timeout_s = dataset, grade_timeout_s
        self.sampler_rows = sampler_rows
        rc = cfg.rollout
        self.sampling = SamplingParams(rc.max_new_tokens, rc.temperature, top_p=rc.top_p)
        self.sampler = Sampler(model_cfg, eos_id=vocabulary.eos_id, pad_id=0, mesh=mesh,
                               rules=tuple(rules))
        model = Transformer(model_cfg)
        updates = total_steps * rc.updates_per_step
        if algo == "grpo":
            self.tx = cfg.optim.make(updates)
            prepare = grpo.make_prepare_fn(model, cfg)
            update = grpo.make_update_step(model, self.tx, cfg)
        else:
            self.critic = ppo.ValueModel(model_cfg)
            self.tx = cfg.actor_optim.make(updates)
            self.critic_tx = cfg.critic_optim.make(updates)
            prepare = ppo.make_prepare_fn(model, self.critic, cfg)
            update = ppo.make_update_step(model, self.critic, self.tx, self.critic_tx, cfg)

        def update_rows(state, rollout, rows_b, rng):
            return update(state, jax.tree.map(lambda x: x[rows_b], rollout), rng)

        self._prepare = jax.jit(prepare)
        self._update = jax.jit(update_rows, donate_argnums=0)
        self._reference_kl = jax.jit(functools.partial(reference_kl, model, cfg))

    def init_state(self, policy_params: Any, rng: jax.Array) -> Any:
        """The train state from (unboxed) policy parameters; `rng` initialises the value head."""
        if self.algo == "grpo":
            return grpo.init_state(policy_params, self.tx)
        dummy = jnp.zeros((1, 2), jnp.int32)
        critic_params = nn.meta.unbox(self.critic.init(rng, dummy, dummy, dummy + 1)["params"])
        return ppo.init_state(policy_params, critic_params, self.tx, self.critic_tx)

    def policy(self, state: Any) -> Any:
        return state.params if self.algo == "grpo" else state.actor.params

    def rl_step(self, state: Any) -> int:
        """RL steps completed (the policy's optimizer steps / updates per rollout)."""
        policy_state = state if self.algo == "grpo" else state.actor
        return int(policy_state.step) // self.cfg.rollout.updates_per_step

    def step(self, state: Any, ref_params: Any, problems: Sequence[dict],
             rng: jax.Array) -> tuple[Any, dict[str, float]]:
        """One RL step on `prompts_per_step` problems."""
        rc = self.cfg.rollout
        if len(problems) != rc.prompts_per_step:
            raise ValueError(f"need {rc.prompts_per_step} problems, got {len(problems)}")
        sample_rng, update_rng = jax.random.split(rng)
        sample = sample_and_grade(
            self.sampler, self.policy(state), problems, self.vocabulary, self.sampling,
            rc.samples_per_prompt, rc.max_prompt_len, sample_rng, dataset=self.dataset,
            grade_timeout_s=self.grade_timeout_s, rows_per_call=self.sampler_rows)
        start = time.perf_counter()
        in_loss = ref_params if self.cfg.uses_reference else None
        rollout, prepare_metrics = self._prepare(
            state, in_loss, sample.prompts_BxP, sample.prompt_lengths_B,
            sample.completions_BxN, sample.completion_lengths_B, sample.info.rewards)
        update_metrics = []
        for epoch in range(rc.epochs):
            epoch_rng = jax.random.fold_in(update_rng, epoch)
            order = jax.random.permutation(epoch_rng, rc.rollout_size)
            for i, rows in enumerate(order.reshape(-1, rc.train_batch_size)):
                state, metrics = self._update(state, rollout, rows,
                                              jax.random.fold_in(epoch_rng, i))
                update_metrics.append(metrics)
        if ref_params is not None and in_loss is None:
            prepare_metrics["kl"] = self._reference_kl(ref_params, rollout)
        update_metrics, prepare_metrics = jax.device_get((update_metrics, prepare_metrics))
        row = {**rollout_metrics(sample.info),
               **{k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]},
               **{k: float(v) for k, v in prepare_metrics.items()},
               "time/rollout": sample.seconds_sampling, "time/reward": sample.seconds_grading,
               "time/update": time.perf_counter() - start}
        return state, row


def reference_kl(model: Transformer, cfg: grpo.GRPOConfig | ppo.PPOConfig, ref_params: Any,
                 rollout: Rollout) -> jax.Array:
    """Token mean of `cfg.kl_estimator`(policy at rollout time || reference) over the completions:
    the KL that is reported when it is not part of the loss (kl_coef = 0)."""
    rc = cfg.rollout
    inputs = (rollout.tokens_BxT, rollout.positions_BxT, rollout.segment_ids_BxT)
    ref_logp = common.map_micro_batches(
        lambda micro: common.sequence_logprobs(model, ref_params, *micro, rc.temperature)[0],
        inputs, rc.micro_batch_size)
    kl = common.get("kl", cfg.kl_estimator)(rollout.old_logp_BxT, ref_logp)
    return common.masked_mean(kl, rollout.mask_BxT)


def cycle_problems(source: Sequence[dict], seed: int) -> Iterator[dict]:
    """Endless passes (episodes) over `source` (e.g. `ProblemSource(split="rl", ...)`), each in
    a fresh seeded order."""
    for episode in itertools.count():
        for i in np.random.default_rng([seed, episode]).permutation(len(source)):
            yield source[int(i)]


def run_rl_steps(trainer: RLTrainer, state: Any, ref_params: Any, problems: Iterator[dict],
                 num_steps: int, rng: jax.Array) -> tuple[Any, list[dict[str, float]]]:
    """`num_steps` RL steps; step k draws its key as fold_in(rng, k) with k counted from the
    state, so a resumed run continues the same stream of keys."""
    rows = []
    for _ in range(num_steps):
        step = trainer.rl_step(state)
        batch = [next(problems) for _ in range(trainer.cfg.rollout.prompts_per_step)]
        state, row = trainer.step(state, ref_params, batch, jax.random.fold_in(rng, step))
        rows.append({"step": step + 1, **row})
    return state, rows
