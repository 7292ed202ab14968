"""The RL post-training job (`configs/lm_rl.py`, kind "lm_rl"): a registered algorithm (GRPO, PPO,
Expert Iteration, ...) from a pretrained checkpoint, run by the shared training loop.

Each loop step is one RL step: the host stage samples `prompts_per_step` x `samples_per_prompt`
completions with the current policy and grades them in the sandbox, and the algorithm's pure
train step (jitted by the loop, sharded by `config.sharding.rules` over `config.mesh`) makes every
update that follows from that rollout.

Files written to the workdir:
- `checkpoints/<step>/`: `state` holds an `algorithm.RLState` (the policy's parameters at the top,
  where `restore.load_params` and `configs/lm_eval.py` read them; its optimizer; PPO's critic; the
  frozen reference), `data` the prompt stream's position, `meta` the model config and algorithm.
  A rerun resumes from the latest one; `kill -9` loses at most `train.checkpoint_every` steps.
- `metrics.jsonl`: one row per RL step and, at step 0, every `eval.every` steps and the last
  step, `eval/...` metrics from `PolicyEval`.
- `plots/style_share.png`, `plots/style_accuracy.png` (`echo_jax.lm.report`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from echo_jax.core import sharding, stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.config import ConfigError
from echo_jax.core.train_loop import LoopConfig, TrainTask, train
from echo_jax.lm import cpu, grading, report, restore
from echo_jax.lm.data import generators, real, vocab
from echo_jax.lm.model import ModelConfig, config_meta
from echo_jax.lm.rl import algorithm, rollout
from echo_jax.lm.rl.policy_eval import PolicyEval
from echo_jax.lm.sampler import Sampler, SamplingParams

SHOWN = (
    "accuracy",
    "style_share/tinygsm",
    "style_share/omi1",
    "style_share/omi2",
    "kl",
    "eval/greedy_pass@1",
)


def build_algorithm(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, vocabulary: Any
) -> algorithm.Algorithm:
    """The registered algorithm `config.algo` from the `rl` block; its errors are ConfigErrors."""
    try:
        return algorithm.get(config.algo)(config.rl, model_cfg, vocabulary, config.train.num_steps)
    except ValueError as e:
        raise ConfigError(f"rl: {e}") from None


def prompt_dataset(config: ml_collections.ConfigDict) -> str:
    if config.data.prompts not in ("synthetic", "gsm8k"):
        raise ConfigError(
            f"data.prompts must be 'synthetic' or 'gsm8k', got {config.data.prompts!r}"
        )
    return config.data.prompts


def load_prompts(config: ml_collections.ConfigDict, vocabulary: Any) -> Sequence[dict]:
    """The RL prompts: the synthetic "rl" split (held out from pretraining) or GSM8K train,
    without the questions longer than `rl.max_prompt_len` tokens."""
    if prompt_dataset(config) == "synthetic":
        return generators.ProblemSource(
            "rl", config.seed, config.data.levels, config.data.num_prompts
        )
    rows = real.load_gsm8k("train")
    fits = [
        r
        for r in rows
        if len(vocabulary.encode(r["question"] + "\n\n")) <= config.rl.max_prompt_len
    ]
    if not fits:
        raise ConfigError(f"no GSM8K question fits rl.max_prompt_len={config.rl.max_prompt_len}")
    if len(fits) < len(rows):
        print(
            f"[rl] {len(rows) - len(fits)} of {len(rows)} GSM8K questions are longer than "
            f"rl.max_prompt_len={config.rl.max_prompt_len} tokens; left out",
            file=sys.stderr,
        )
    return fits


def prompt_stream(source: Sequence[dict], seed: int, prompts_per_step: int):
    """A checkpointable grain iterator of `prompts_per_step` problems per RL step: endless passes
    over `source`, each in a fresh seeded order."""
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    return iter(dataset.to_iter_dataset().batch(prompts_per_step, batch_fn=list))


def model_and_vocabulary(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any]:
    """The policy's config and vocabulary: `init_from`'s, or for planning (no `init_from`) the
    config's `model` block and no vocabulary."""
    if config.init_from:
        model_cfg = restore.model_config(config.init_from, config.init_step or None)
        config.data.vocab = restore.vocab_name(config.init_from)
        return model_cfg, vocab.get_vocabulary(config.data.vocab)
    return ModelConfig(**config.model.to_dict()), None


def make_sampler(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, vocabulary: Any, mesh: Any
) -> Sampler:
    eos_id = vocabulary.eos_id if vocabulary is not None else 1
    return Sampler(
        model_cfg,
        eos_id=eos_id,
        pad_id=0,
        mesh=mesh,
        rules=tuple(map(tuple, config.sharding.rules)),
    )


def sampling_params(rollout_cfg: Any) -> SamplingParams:
    return SamplingParams(
        rollout_cfg.max_new_tokens, rollout_cfg.temperature, top_p=rollout_cfg.top_p
    )


def make_host_stage(
    config: ml_collections.ConfigDict,
    algo: algorithm.Algorithm,
    sampler: Sampler,
    more_prompts: Iterator[list[dict]] | None = None,
):
    """`(state, problems, rng) -> (batch, metrics)`: sample and grade a rollout with the current
    policy; the algorithm turns it into its batch.

    With `rl.dynamic_sampling` = n > 0 (DAPO's dynamic sampling), groups whose rewards are all
    equal are replaced by groups of further prompts from `more_prompts` (the prompt stream), up
    to n extra sampling rounds; what is still missing then is filled with flat groups. Metrics:
    `dynamic/rounds`, `dynamic/flat_kept` (the share of the batch's groups that are flat)."""
    rc, r = algo.rollout, config.rl
    sampling, dataset = sampling_params(rc), prompt_dataset(config)

    def sample(state: algorithm.RLState, problems: list[dict], rng: jax.Array) -> rollout.Sample:
        return rollout.sample_and_grade(
            sampler,
            state.params,
            problems,
            algo.vocabulary,
            sampling,
            rc.samples_per_prompt,
            rc.max_prompt_len,
            rng,
            dataset=dataset,
            grade_timeout_s=r.grade_timeout_s,
            rows_per_call=r.sampler_batch_size,
            grader=r.grader,
        )

    def dynamic(state, problems, rng) -> tuple[rollout.Sample, dict[str, float]]:
        samples, informative, flat = [], [], []
        for round_ in range(r.dynamic_sampling + 1):
            if round_:
                problems = next(more_prompts)
            samples.append(sample(state, problems, jax.random.fold_in(rng, round_)))
            is_flat = rollout.flat_groups(samples[-1].info, rc.samples_per_prompt)
            for g, f in enumerate(is_flat):
                (flat if f else informative).append((len(samples) - 1, g))
            if len(informative) >= rc.prompts_per_step:
                break
        picks = (informative + flat)[: rc.prompts_per_step]
        kept_flat = sum(p in flat for p in picks) / rc.prompts_per_step
        merged = rollout.select_groups(samples, picks, rc.samples_per_prompt)
        return merged, {"dynamic/rounds": float(len(samples)), "dynamic/flat_kept": kept_flat}

    def host_stage(state: algorithm.RLState, problems: list[dict], rng: jax.Array):
        sample_rng, batch_rng = jax.random.split(rng)
        extra = {}
        if r.dynamic_sampling and more_prompts is not None:
            drawn, extra = dynamic(state, problems, sample_rng)
        else:
            drawn = sample(state, problems, sample_rng)
        shuffle = np.random.default_rng(np.asarray(jax.random.key_data(batch_rng)))
        batch, metrics = algo.batch(drawn, shuffle)
        return batch, {
            **rollout.rollout_metrics(drawn.info),
            **metrics,
            **extra,
            "time/rollout": drawn.seconds_sampling,
            "time/reward": drawn.seconds_grading,
        }

    return host_stage


def placeholder_sample(rc: Any) -> rollout.Sample:
    """A graded rollout of the right shapes with nothing in it (for planning)."""
    rows = rc.rollout_size
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    info = rollout.RolloutInfo(
        questions=("",) * rows,
        texts=("",) * rows,
        styles=("",) * rows,
        rewards=np.zeros(rows, np.float32),
        correct=np.zeros(rows, bool),
        lengths=zeros(rows),
        stopped=np.ones(rows, bool),
    )
    return rollout.Sample(
        zeros(rows, rc.max_prompt_len),
        zeros(rows) + 1,
        zeros(rows, rc.max_new_tokens),
        zeros(rows),
        info,
        0.0,
        0.0,
    )


def make_task(
    config: ml_collections.ConfigDict, mesh: Any, *, for_planning: bool = False
) -> tuple[TrainTask, algorithm.Algorithm, Sampler]:
    """The RL job as a `TrainTask` for the shared loop, with its algorithm and sampler. For
    planning (`python -m echo_jax.plan`) nothing is read: no prompts, checkpoint or evaluation."""
    model_cfg, vocabulary = model_and_vocabulary(config)
    algo = build_algorithm(config, model_cfg, vocabulary)
    cpu.prepare(model_cfg, mesh)
    sampler = make_sampler(config, model_cfg, vocabulary, mesh)
    task = TrainTask(
        init_state=algo.init_state,
        train_step=algo.train_step,
        train_iter=None,
        meta={**config_meta(model_cfg), "algo": config.algo},
        metric_prefix="",
        shown=SHOWN,
    )
    if for_planning:
        return task, algo, sampler
    rows = algo.rollout.rollout_size
    if rows % sharding.batch_divisor(mesh):
        raise ConfigError(
            f"the rollout's {rows} rows are not divisible by the "
            f"{sharding.batch_divisor(mesh)} data x fsdp shards of the mesh"
        )
    prompts = load_prompts(config, vocabulary)
    init_step = config.init_step or None

    def warm_start(state: algorithm.RLState) -> algorithm.RLState:
        shardings = jax.tree.map(lambda x: x.sharding, state.params)
        pretrained = restore.load_params(config.init_from, init_step, shardings=shardings)[1]
        return algo.warm_start(state, pretrained)

    evaluate = None
    if config.eval.per_level:
        policy_eval = PolicyEval(config, sampler, vocabulary)
        evaluate = lambda state: policy_eval(state.params)  # noqa: E731
    stream = prompt_stream(prompts, config.seed, algo.rollout.prompts_per_step)
    return (
        dataclasses.replace(
            task,
            train_iter=stream,
            warm_start=warm_start,
            host_stage=make_host_stage(config, algo, sampler, more_prompts=stream),
            evaluate=evaluate,
            evaluate_at_start=True,
        ),
        algo,
        sampler,
    )


def run_rl(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) RL to `train.num_steps`."""
    if config.algo not in algorithm.names():
        raise ConfigError(f"algo must be one of {algorithm.names()}, got {config.algo!r}")
    if not config.init_from:
        raise ConfigError("config.init_from is required: a pretraining workdir")
    if config.rl.grader not in grading.GRADERS:
        raise ConfigError(f"rl.grader must be one of {grading.GRADERS}, got {config.rl.grader!r}")
    prompt_dataset(config)
    num_steps = config.train.num_steps
    if stages.reached_step(workdir, num_steps):
        config.data.vocab = restore.vocab_name(config.init_from)  # as make_task records it
        workdir_lib.record_run(workdir, config, step=stages.latest_step(workdir), label="rl")
        print(f"[rl] {workdir} already finished {num_steps} steps", file=sys.stderr)
        report.plot_rl(workdir)
        return
    mesh = sharding.config_mesh(config.mesh.to_dict())
    task, _, _ = make_task(config, mesh)
    loop = LoopConfig(
        num_steps=num_steps,
        log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every,
        eval_every=config.eval.every,
        keep_checkpoints=config.train.keep_checkpoints,
        async_checkpoints=config.train.async_checkpoints,
        log_checkpoints=config.train.log_checkpoints,
    )
    train(task, loop, mesh, config.sharding.rules, workdir, config.seed, config=config, label="rl")
    if jax.process_index() == 0:
        report.plot_rl(workdir)
