"""Expert Iteration (as the study ran it): sample many completions per training question, keep
the verified-correct ones, drop duplicate (question, completion) pairs, fine-tune on them with the
next-token loss on the completion only, and repeat for R rounds from the fine-tuned model.

SFT examples have the pretraining layout (`encode(question + "\\n\\n") + encode(completion) +
[EOS]`, as `data.pipeline.Tokenize`), one per row, right-padded to `seq_len`. Unlike the study's
data loader, a final partial batch is kept and padded with empty rows: the loss is a sum over
target tokens divided by their count, so empty rows change nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Hashable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from echo_jax.lm import pretrain
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.pretrain import TrainState
from echo_jax.lm.rl import common, rollout as loop
from echo_jax.lm.rl.common import OptimConfig
from echo_jax.lm.sampler import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class EIConfig:
    """The study's EI: 64 samples per question at temperature 1.0, top-p 0.95, up to 2048 new
    tokens; SFT at lr 1e-4 for 2 epochs, batches of 256 (micro 8), max length 1024. The number of
    rounds is not confirmed by the study's code (each round was a separate launch)."""

    samples_per_prompt: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 2048
    max_prompt_len: int = 1024
    prompts_per_batch: int = 8
    rounds: int = 3
    epochs: int = 2
    batch_size: int = 256
    micro_batch_size: int = 8
    seq_len: int = 1024
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))

    def __post_init__(self):
        sizes = (self.samples_per_prompt, self.max_new_tokens, self.max_prompt_len,
                 self.prompts_per_batch, self.rounds, self.epochs, self.batch_size,
                 self.micro_batch_size, self.seq_len)
        if min(sizes) < 1:
            raise ValueError(f"every size must be >= 1: {self}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1: {self}")


def select_expert_samples(prompt_keys: Sequence[Hashable], texts: Sequence[str],
                          correct: Sequence[bool]) -> list[int]:
    """Indices of the correct samples, keeping the first of each (prompt, text) pair."""
    seen, keep = set(), []
    for i, (key, text, ok) in enumerate(zip(prompt_keys, texts, correct, strict=True)):
        if ok and (key, text) not in seen:
            seen.add((key, text))
            keep.append(i)
    return keep


def sft_example(vocabulary: Any, question: str, completion: str,
                seq_len: int) -> dict[str, np.ndarray]:
    """One row: inputs, targets, loss_mask (1 on completion tokens and the final EOS),
    segment_ids and positions, truncated / padded to `seq_len`."""
    prompt = list(vocabulary.encode(question + "\n\n"))
    tokens = np.asarray(prompt + list(vocabulary.encode(completion)) + [vocabulary.eos_id],
                        np.int32)[:seq_len + 1]
    n = len(tokens) - 1
    row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.arange(seq_len, dtype=np.int32)}
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["loss_mask"][len(prompt) - 1:n] = 1.0  # target j is token j + 1
    row["segment_ids"][:n] = 1
    return row


def sft_batches(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
                rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """One shuffled epoch of [batch_size, seq_len] batches; the last is padded with empty rows."""
    order = rng.permutation(len(rows))
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": stats["loss"] / jnp.maximum(stats["normaliser"], 1.0),
                   "grad_norm": optax.tree.norm(grads), "target_tokens": stats["normaliser"]}
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), metrics

    return sft_step


def collect_expert_data(sampler: Sampler, params: Any, problems: Sequence[dict], vocabulary: Any,
                        cfg: EIConfig, rng: jax.Array, *, dataset: str,
                        grade_timeout_s: float = 2.0) -> tuple[list[tuple[str, str]], dict]:
    """Samples `cfg.samples_per_prompt` completions of every problem, `prompts_per_batch` problems
    at a time (the last batch is filled with repeats, whose samples are dropped), grades them and
    returns the deduplicated correct (question, completion) pairs with generation metrics."""
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, top_p=cfg.top_p)
    infos = []
    for start in range(0, len(problems), cfg.prompts_per_batch):
        chunk = list(problems[start:start + cfg.prompts_per_batch])
        real = len(chunk) * cfg.samples_per_prompt
        chunk += [chunk[0]] * (cfg.prompts_per_batch - len(chunk))
        sample = loop.sample_and_grade(
            sampler, params, chunk, vocabulary, sampling, cfg.samples_per_prompt,
            cfg.max_prompt_len, jax.random.fold_in(rng, start), dataset=dataset,
            grade_timeout_s=grade_timeout_s)
        infos.append(loop.truncate_info(sample.info, real))
    info = loop.concat_infos(infos)
    keep = select_expert_samples(info.questions, info.texts, info.correct)
    examples = [(info.questions[i], info.texts[i]) for i in keep]
    return examples, {**loop.rollout_metrics(info), "kept": len(examples)}


def run_expert_iteration(cfg: EIConfig, model_cfg: ModelConfig, params: Any,
                         problems: Sequence[dict], vocabulary: Any, rng: jax.Array, *,
                         dataset: str = "synthetic") -> tuple[Any, list[dict[str, float]]]:
    """R rounds of sample -> keep correct -> SFT (fresh optimizer each round, schedule over that
    round's updates); each round fine-tunes the previous round's model. Returns the final
    parameters and one metrics row per round (generation metrics, `kept`, `sft_loss`)."""
    model = Transformer(model_cfg)
    sampler = Sampler(model_cfg, eos_id=vocabulary.eos_id, pad_id=0)
    rows_per_round = []
    for r in range(cfg.rounds):
        round_rng = jax.random.fold_in(rng, r)
        examples, metrics = collect_expert_data(sampler, params, problems, vocabulary, cfg,
                                                round_rng, dataset=dataset)
        if examples:
            rows = [sft_example(vocabulary, q, c, cfg.seq_len) for q, c in examples]
            per_epoch = -(-len(rows) // cfg.batch_size)
            tx = cfg.optim.make(cfg.epochs * per_epoch)
            state = TrainState(step=jnp.zeros((), jnp.int32),
                               params=jax.tree.map(jnp.array, params), opt_state=None)
            state = state.replace(opt_state=tx.init(state.params))
            step = jax.jit(make_sft_step(model, tx, cfg.micro_batch_size), donate_argnums=0)
            shuffle = np.random.default_rng(np.asarray(jax.random.key_data(round_rng)))
            losses = []
            for _ in range(cfg.epochs):
                for batch in sft_batches(rows, cfg.batch_size, shuffle):
                    state, m = step(state, batch, round_rng)
                    losses.append(m["loss"])
            params = state.params
            metrics["sft_loss"] = float(np.mean(jax.device_get(losses)))
        rows_per_round.append({"round": r, **metrics})
    return params, rows_per_round


class EITrainer:
    """Expert Iteration as steps of the loop GRPO and PPO run in (`loop.RLTrainer`'s interface):
    each step samples `prompts_per_batch` x `samples_per_prompt` completions, keeps the correct
    unique ones and fine-tunes on them for `epochs` passes. Unlike `run_expert_iteration` one
    optimizer runs across steps (its schedule spans the most updates `total_steps` can take), so a
    step is a small round and the run is checkpointed like the others. Batches are padded to
    `batch_size` rows of `seq_len`: one compiled shape however many samples are kept;
    `sampler_rows` as in `loop.RLTrainer`.
    """

    def __init__(self, cfg: EIConfig, model_cfg: ModelConfig, vocabulary: Any, *,
                 total_steps: int, dataset: str = "synthetic", grade_timeout_s: float = 2.0,
                 mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] = (),
                 sampler_rows: int = 0):
        self.cfg, self.vocabulary, self.sampler_rows = cfg, vocabulary, sampler_rows
        self.dataset, self.grade_timeout_s = dataset, grade_timeout_s
        self.sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, top_p=cfg.top_p)
        self.sampler = Sampler(model_cfg, eos_id=vocabulary.eos_id, pad_id=0, mesh=mesh,
                               rules=tuple(rules))
        model = Transformer(model_cfg)
        rows = cfg.prompts_per_batch * cfg.samples_per_prompt
        self.tx = cfg.optim.make(total_steps * cfg.epochs * -(-rows // cfg.batch_size))
        self._sft = jax.jit(make_sft_step(model, self.tx, cfg.micro_batch_size), donate_argnums=0)

        def stats(params, ref_params, *sample_arrays):
            """Entropy of the sampling policy on its completions and, with a reference, k3 KL."""
            tokens, positions, segments, mask = common.join_prompt_completion(*sample_arrays)

            def score(micro):
                logp, entropy = common.sequence_logprobs(model, params, *micro, cfg.temperature)
                if ref_params is None:
                    return entropy, None
                ref_logp = common.sequence_logprobs(model, ref_params, *micro,
                                                    cfg.temperature)[0]
                return entropy, common.kl_k3(logp, ref_logp)

            entropy, kl = common.map_micro_batches(score, (tokens, positions, segments),
                                                   cfg.micro_batch_size)
            out = {"entropy": common.masked_mean(entropy, mask)}
            if kl is not None:
                out["kl"] = common.masked_mean(kl, mask)
            return out

        self._stats = jax.jit(stats)

    def init_state(self, policy_params: Any, rng: jax.Array) -> TrainState:
        del rng  # nothing random to initialise
        params = jax.tree.map(jnp.array, policy_params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))

    def policy(self, state: TrainState) -> Any:
        return state.params

    def step(self, state: TrainState, ref_params: Any, problems: Sequence[dict],
             rng: jax.Array) -> tuple[TrainState, dict[str, float]]:
        """One round on `prompts_per_batch` problems. Metrics: the rollout's, `kept`, the SFT
        `loss` and `grad_norm` (when something was kept), the sampling policy's `entropy` and,
        given `ref_params`, its `kl` to them (EI has no KL term: it is only measured)."""
        cfg = self.cfg
        if len(problems) != cfg.prompts_per_batch:
            raise ValueError(f"need {cfg.prompts_per_batch} problems, got {len(problems)}")
        sample_rng, sft_rng = jax.random.split(rng)
        sample = loop.sample_and_grade(
            self.sampler, state.params, problems, self.vocabulary, self.sampling,
            cfg.samples_per_prompt, cfg.max_prompt_len, sample_rng, dataset=self.dataset,
            grade_timeout_s=self.grade_timeout_s, rows_per_call=self.sampler_rows)
        start = time.perf_counter()
        info = sample.info
        row = {**loop.rollout_metrics(info), **self._stats(
            state.params, ref_params, sample.prompts_BxP, sample.prompt_lengths_B,
            sample.completions_BxN, sample.completion_lengths_B)}
        keep = select_expert_samples(info.questions, info.texts, info.correct)
        examples = [sft_example(self.vocabulary, info.questions[i], info.texts[i], cfg.seq_len)
                    for i in keep]
        shuffle = np.random.default_rng(np.asarray(jax.random.key_data(sft_rng)))
        metrics = []
        for _ in range(cfg.epochs if examples else 0):
            for batch in sft_batches(examples, cfg.batch_size, shuffle):
                state, m = self._sft(state, batch, sft_rng)
                metrics.append(m)
        metrics = jax.device_get(metrics)
        row = {k: float(v) for k, v in jax.device_get(row).items()}
        row["kept"] = float(len(examples))
        for key in ("loss", "grad_norm"):
            if metrics:
                row[key] = float(np.mean([m[key] for m in metrics]))
        row.update({"time/rollout": sample.seconds_sampling, "time/reward": sample.seconds_grading,
                    "time/update": time.perf_counter() - start})
        return state, row
