"""The RL post-training job (`configs/lm_rl.py`, kind "lm_rl"): GRPO, PPO or Expert Iteration
from a pretrained checkpoint, one RL step (rollout -> reward -> advantages -> update) at a time.

Files written to the workdir:
- `checkpoints/<step>/`: `state` holds an `RLJobState` (the policy's parameters at the top, where
  `restore.load_params` and `configs/lm_eval.py` read them; its optimizer; PPO's critic; the
  frozen reference; the RNG and the prompt position), `meta` the model config. A rerun resumes
  from the latest one; `kill -9` loses at most `train.checkpoint_every` steps.
- `metrics.jsonl`: one row per RL step (see `loop.RLTrainer`) and, at step 0, every `eval.every`
  steps and the last step, `eval/...` rows from `PolicyEval`.
- `plots/style_share.png`, `plots/style_accuracy.png` (`echo_jax.lm.report`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from echo_jax.core import sharding
from echo_jax.core.checkpoint import Checkpointer, tree_signature
from echo_jax.core.config import ConfigError, save_config
from echo_jax.core.metrics import MetricWriter, Progress
from echo_jax.core.train_loop import NonFiniteLossError, Preempted, SigtermFlag
from echo_jax.lm import eval as eval_lib
from echo_jax.lm import grading, report, restore
from echo_jax.lm.data import generators, real, vocab
from echo_jax.lm.pretrain import TrainState
from echo_jax.lm.rl import common, expert_iteration, grpo, rollout as loop, ppo
from echo_jax.lm.sampler import SamplingParams

ALGOS = ("grpo", "ppo", "ei")
_SHOWN = ("accuracy", "style_share/tinygsm", "style_share/omi1", "style_share/omi2", "kl",
          "eval/greedy_pass@1")


@flax.struct.dataclass
class RLJobState:
    """What a resumed run needs. `step` counts the policy's optimizer steps; `critic` is PPO's
    (else None); `ref_params` the initial policy (None when no KL is used or reported); `rng`
    the run's key data; `prompt_index` how many prompts the run has consumed."""

    params: Any
    opt_state: Any
    step: jax.Array
    critic: TrainState | None
    ref_params: Any
    rng: jax.Array
    prompt_index: jax.Array


def pack(trainer_state: Any, ref_params: Any, rng: jax.Array, prompt_index: int) -> RLJobState:
    actor, critic = ((trainer_state.actor, trainer_state.critic)
                     if isinstance(trainer_state, ppo.PPOState) else (trainer_state, None))
    return RLJobState(params=actor.params, opt_state=actor.opt_state, step=actor.step,
                      critic=critic, ref_params=ref_params, rng=rng,
                      prompt_index=jnp.asarray(prompt_index, jnp.int32))


def unpack(state: RLJobState) -> Any:
    """The trainer's state (a `TrainState`, or a `ppo.PPOState` when there is a critic)."""
    actor = TrainState(step=state.step, params=state.params, opt_state=state.opt_state)
    return actor if state.critic is None else ppo.PPOState(actor, state.critic)


def make_trainer(config: ml_collections.ConfigDict, model_cfg: Any, vocabulary: Any,
                 mesh: Any) -> loop.RLTrainer | expert_iteration.EITrainer:
    """The algorithm's trainer from the `rl` block; the dataclasses' checks become ConfigErrors."""
    r, algo = config.rl, config.algo
    kwargs = dict(total_steps=config.train.num_steps, dataset=prompt_dataset(config),
                  grade_timeout_s=r.grade_timeout_s, mesh=mesh, rules=config.sharding.rules,
                  sampler_rows=r.sampler_batch_size)
    optim = lambda lr: common.OptimConfig(lr=lr, warmup_ratio=r.warmup_ratio,
                                          min_lr_ratio=r.min_lr_ratio)
    try:
        if algo == "ei":
            if r.kl_coef:
                raise ValueError("Expert Iteration has no KL term: set rl.kl_coef=0")
            cfg = expert_iteration.EIConfig(
                samples_per_prompt=r.samples_per_prompt, temperature=r.temperature,
                top_p=r.top_p, max_new_tokens=r.max_new_tokens, max_prompt_len=r.max_prompt_len,
                prompts_per_batch=r.prompts_per_step, rounds=1, epochs=r.epochs,
                batch_size=r.train_batch_size, micro_batch_size=r.micro_batch_size,
                seq_len=r.max_prompt_len + r.max_new_tokens, optim=optim(r.lr))
            return expert_iteration.EITrainer(cfg, model_cfg, vocabulary, **kwargs)
        rollout = common.RolloutConfig(
            prompts_per_step=r.prompts_per_step, samples_per_prompt=r.samples_per_prompt,
            temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
            max_prompt_len=r.max_prompt_len, train_batch_size=r.train_batch_size,
            micro_batch_size=r.micro_batch_size, epochs=r.epochs)
        loss = common.PolicyLossConfig(eps_low=r.eps_low, eps_high=r.eps_high,
                                       aggregation=r.aggregation)
        if algo == "grpo":
            cfg = grpo.GRPOConfig(rollout=rollout, loss=loss, optim=optim(r.lr),
                                  advantage=r.advantage, kl_coef=r.kl_coef,
                                  kl_estimator=r.kl_estimator)
        else:
            cfg = ppo.PPOConfig(rollout=rollout, loss=loss, actor_optim=optim(r.lr),
                                critic_optim=optim(r.critic_lr), kl_coef=r.kl_coef,
                                kl_estimator=r.kl_estimator, gamma=r.gamma, lam=r.lam,
                                value_clip=r.value_clip)
        return loop.RLTrainer(algo, cfg, model_cfg, vocabulary, **kwargs)
    except ValueError as e:
        raise ConfigError(f"rl: {e}") from None


def prompt_dataset(config: ml_collections.ConfigDict) -> str:
    if config.data.prompts not in ("synthetic", "gsm8k"):
        raise ConfigError(f"data.prompts must be 'synthetic' or 'gsm8k', got "
                          f"{config.data.prompts!r}")
    return config.data.prompts


def load_prompts(config: ml_collections.ConfigDict, vocabulary: Any) -> Sequence[dict]:
    """The RL prompts: the synthetic "rl" split (held out from pretraining) or GSM8K train,
    without the questions longer than `rl.max_prompt_len` tokens."""
    if prompt_dataset(config) == "synthetic":
        return generators.ProblemSource("rl", config.seed, config.data.levels,
                                        config.data.num_prompts)
    rows = real.load_gsm8k("train")
    fits = [r for r in rows
            if len(vocabulary.encode(r["question"] + "\n\n")) <= config.rl.max_prompt_len]
    if not fits:
        raise ConfigError(f"no GSM8K question fits rl.max_prompt_len={config.rl.max_prompt_len}")
    if len(fits) < len(rows):
        print(f"[rl] {len(rows) - len(fits)} of {len(rows)} GSM8K questions are longer than "
              f"rl.max_prompt_len={config.rl.max_prompt_len} tokens; left out", file=sys.stderr)
    return fits


@functools.lru_cache(maxsize=4)
def _episode_order(seed: int, episode: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, episode]).permutation(size)


def prompt_batch(source: Sequence[dict], seed: int, start: int, count: int) -> list[dict]:
    """Items start .. start + count - 1 of the stream `loop.cycle_problems(source, seed)`
    yields (passes over `source`, each in a fresh seeded order), by position: resumable."""
    out = []
    for k in range(start, start + count):
        episode, i = divmod(k, len(source))
        out.append(source[int(_episode_order(seed, episode, len(source))[i])])
    return out


class PolicyEval:
    """On `eval.per_level` held-out test problems per level: greedy pass@1 and the greedy style
    shares; with `eval.num_samples` = n > 0 also unbiased pass@k (k = 1, 2, 4, ..., n) and the
    style shares of the samples. `eval/<metric>` averages the levels the policy is trained on.
    Shapes are fixed (two compiles in all) and every evaluation draws with the same key."""

    def __init__(self, config: ml_collections.ConfigDict, sampler: Any, vocabulary: Any):
        e = config.eval
        self.sampler, self.vocabulary, self.num_samples = sampler, vocabulary, e.num_samples
        self.timeout_s = config.rl.grade_timeout_s
        self.problems = {level: [generators.ProblemSource("test", config.seed, (level,),
                                                          e.per_level)[i]
                                 for i in range(e.per_level)] for level in e.levels}
        self.train_levels = [lv for lv in e.levels if lv in config.data.levels]
        longest = max(len(vocabulary.encode(p["question"] + "\n\n"))
                      for ps in self.problems.values() for p in ps)
        self.width = -(-longest // 64) * 64
        self.greedy = SamplingParams(e.max_new_tokens)
        self.sampled = SamplingParams(e.max_new_tokens, e.temperature, top_p=e.top_p)
        self.greedy_rows = min(e.batch_size, e.per_level)
        self.sampled_prompts = max(e.batch_size // max(e.num_samples, 1), 1)
        self.rng = jax.random.key(config.seed + 1)

    def _run(self, params, problems: list[dict], sampling: SamplingParams, samples: int,
             prompts_per_call: int) -> common.RolloutInfo:
        infos = []
        for start in range(0, len(problems), prompts_per_call):
            chunk = problems[start:start + prompts_per_call]
            real_rows = len(chunk) * samples
            chunk = chunk + [chunk[-1]] * (prompts_per_call - len(chunk))
            sample = loop.sample_and_grade(
                self.sampler, params, chunk, self.vocabulary, sampling, samples, self.width,
                jax.random.fold_in(self.rng, start), dataset="synthetic",
                grade_timeout_s=self.timeout_s)
            infos.append(loop.truncate_info(sample.info, real_rows))
        return loop.concat_infos(infos)

    @staticmethod
    def _shares(info: common.RolloutInfo, prefix: str) -> dict[str, float]:
        styles = np.asarray(info.styles)
        return {f"{prefix}/{s}": float((styles == s).mean()) for s in grading.STYLE_LABELS}

    def __call__(self, params: Any) -> dict[str, float]:
        per_level: dict[int, dict[str, float]] = {}
        for level, problems in self.problems.items():
            greedy = self._run(params, problems, self.greedy, 1, self.greedy_rows)
            out = {"greedy_pass@1": float(greedy.correct.mean()),
                   **self._shares(greedy, "greedy_share")}
            if self.num_samples:
                n = self.num_samples
                sampled = self._run(params, problems, self.sampled, n, self.sampled_prompts)
                correct = sampled.correct.reshape(len(problems), n).sum(-1)
                out.update({f"pass@{k}": float(np.mean([eval_lib.pass_at_k(n, int(c), k)
                                                        for c in correct]))
                            for k in eval_lib.k_ladder(n)})
                out.update(self._shares(sampled, "sampled_share"))
            per_level[level] = out
        row = {f"eval/L{lv}/{k}": v for lv, out in per_level.items() for k, v in out.items()}
        if self.train_levels:
            for key in per_level[self.train_levels[0]]:
                row[f"eval/{key}"] = float(np.mean([per_level[lv][key]
                                                    for lv in self.train_levels]))
        return row


def _mesh(config: ml_collections.ConfigDict):
    sizes = config.mesh.to_dict()
    devices = jax.devices()
    if -1 not in sizes.values():
        devices = devices[:math.prod(sizes.values())]
    return sharding.make_mesh(sizes, devices)


def is_finished(workdir: str, num_steps: int) -> bool:
    """Whether `workdir` holds the final checkpoint of a run of `num_steps` RL steps."""
    try:
        return restore.latest_step(workdir) >= num_steps
    except FileNotFoundError:
        return False


def run_rl(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) RL to `train.num_steps`; returns the last metrics row."""
    if config.algo not in ALGOS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {config.algo!r}")
    if not config.init_from:
        raise ConfigError("config.init_from is required: a pretraining workdir")
    num_steps = config.train.num_steps
    if is_finished(workdir, num_steps):
        print(f"[rl] {workdir} already finished {num_steps} steps", file=sys.stderr)
        report.plot_rl(workdir)
        return {}
    mesh = _mesh(config)
    model_cfg, params = restore.load_params(config.init_from, config.init_step or None, mesh)
    config.data.vocab = restore.vocab_name(config.init_from)
    vocabulary = vocab.get_vocabulary(config.data.vocab)
    prompts = load_prompts(config, vocabulary)
    trainer = make_trainer(config, model_cfg, vocabulary, mesh)
    evaluate = PolicyEval(config, trainer.sampler, vocabulary) if config.eval.per_level else None

    base_rng = jax.random.key(config.seed)
    use_ref = config.rl.kl_coef > 0 or config.rl.log_kl
    state = pack(trainer.init_state(params, jax.random.fold_in(base_rng, 1)),
                 params if use_ref else None, jax.random.key_data(base_rng), 0)
    # Every leaf replicated as the steps return it: the second step does not recompile.
    state = jax.device_put(state, sharding.replicated(mesh))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            state)
    meta = {"model": dataclasses.asdict(model_cfg), "algo": config.algo, "seed": config.seed,
            "signature": tree_signature(abstract)}
    t = config.train
    ckpt = Checkpointer(f"{workdir}/checkpoints", keep=t.keep_checkpoints,
                        async_save=t.async_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        ckpt.check_compatible(start, meta)
        state = ckpt.restore(start, abstract, None)
        print(f"[rl] resumed from {ckpt.directory} at step {start}", file=sys.stderr)
    if jax.process_index() == 0:
        save_config(config, workdir)
    writer = MetricWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    progress = Progress(num_steps, start, label=f"rl {config.algo}")
    rows_per_step = config.rl.prompts_per_step
    rng = jax.random.wrap_key_data(state.rng)
    ref_params, index = state.ref_params, int(state.prompt_index)
    trainer_state = unpack(state)
    row: dict[str, float] = {}
    last_good = start
    try:
        with SigtermFlag() as sigterm:
            if start == 0 and evaluate:
                progress.show(0, _shown(writer.write(0, evaluate(trainer.policy(trainer_state)))))
            for step in range(start + 1, num_steps + 1):
                batch = prompt_batch(prompts, config.seed, index, rows_per_step)
                trainer_state, row = trainer.step(trainer_state, ref_params, batch,
                                                  jax.random.fold_in(rng, step))
                index += rows_per_step
                if not math.isfinite(row.get("loss", 0.0)):
                    raise NonFiniteLossError(
                        f"loss is {row['loss']} at RL step {step}; stopped. Last good "
                        f"checkpoint: step {last_good} in {ckpt.directory}")
                done = step == num_steps
                evaluated = evaluate and (
                    done or (config.eval.every and step % config.eval.every == 0))
                if evaluated:
                    row.update(evaluate(trainer.policy(trainer_state)))
                if done or evaluated or step % t.log_every == 0:
                    row = writer.write(step, {**row, **progress.rates(step)})
                    progress.show(step, _shown(row))
                if done or step % t.checkpoint_every == 0 or sigterm.raised:
                    ckpt.save(step, pack(trainer_state, ref_params, state.rng, index), None,
                              meta)
                    last_good = step
                if sigterm.raised:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM at RL step {step}: checkpoint saved in "
                                    f"{ckpt.directory}")
    finally:
        ckpt.close()
        writer.close()
    if jax.process_index() == 0:
        report.plot_rl(workdir)
    return row


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a progress line: accuracy, style shares, KL, greedy pass@1, rates."""
    return {k: row[k] for k in (*_SHOWN, "perf/steps_per_s") if k in row}
