"""Expert Iteration as the study ran it (`configs/lm_rl.py:ei|study_ei`, kind "lm_ei"): rounds
over the whole prompt set, each a separate launch in the study (`openrlhf/cli/train_ei.py`).

Round r:
1. **Sample**: `rl.samples_per_prompt` completions of every prompt (temperature 1.0, top-p 0.95 in
   the study) from the model after round r - 1 (round 0: `init_from`), `rl.prompts_per_step`
   prompts at a time; grade each completion alone (the study's EI verifies the generated text,
   not prompt + completion); keep the correct ones, one of each (question, completion) pair.
   Each chunk is appended to `rounds/round_<r>.chunks.jsonl` as it finishes, so a killed round
   resumes at the next chunk; the kept samples, with their style labels, end in
   `rounds/round_<r>.jsonl`.
2. **Fine-tune**: `rl.epochs` shuffled epochs of the kept samples in batches of
   `rl.train_batch_size` (the last partial batch of an epoch dropped, as the study's loader
   does), next-token loss on the completion, AdamW (0.9, 0.95) with 3 % warm-up and cosine to
   0.1 x `rl.lr`: a fresh optimizer, from the `init_from` model (`ei.sft_from="base"`, the study's
   plain rounds) or from the last round's (`"last"`, its `_online` rounds). The shared training
   loop runs it in `rounds/round_<r>/`, a language-model workdir (`config.json`, `checkpoints/`)
   that `lm_eval --config.checkpoint=` and `lm_rl --config.init_from=` read, resumably.
3. **Evaluate** (`eval` block, as RL's `PolicyEval`) and append the round's row to
   `metrics.jsonl` at step r + 1: the sampled completions' accuracy, style shares and
   accuracies, what was kept (`kept`, `kept_share/<style>`), the fine-tuning's updates and loss,
   and `eval/...`. Step 0 holds the evaluation of the initial model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath

from echo_jax.core import sharding, stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.config import ConfigError
from echo_jax.core.files import read_json, read_jsonl, write_json
from echo_jax.core.metrics import MetricWriter
from echo_jax.core.train_loop import LoopConfig, TrainTask, abstract_state, train
from echo_jax.core.train_state import TrainState
from echo_jax.lm import cpu, grading, pretrain, report, restore
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import Transformer, config_meta
from echo_jax.lm.rl import expert_iteration, rollout
from echo_jax.lm.rl.common import OptimConfig
from echo_jax.lm.rl.policy_eval import PolicyEval

SFT_FROM = ("base", "last")
# more rounds may be added; not another initial model (every round reads it)
ROUNDS_MAY_CHANGE = (
    *(p for p in workdir_lib.RESUME_MAY_CHANGE if p != "*init_from"),
    "ei.rounds",
)


def round_dir(workdir: str, r: int) -> epath.Path:
    return epath.Path(workdir) / "rounds" / f"round_{r}"


def check_config(config: ml_collections.ConfigDict) -> None:
    if not config.init_from:
        raise ConfigError("config.init_from is required: a pretraining workdir")
    if config.ei.sft_from not in SFT_FROM:
        raise ConfigError(f"ei.sft_from must be one of {SFT_FROM}, got {config.ei.sft_from!r}")
    if config.rl.grader not in grading.GRADERS:
        raise ConfigError(f"rl.grader must be one of {grading.GRADERS}, got {config.rl.grader!r}")
    if config.rl.train_batch_size % config.rl.micro_batch_size:
        raise ConfigError(
            f"rl.micro_batch_size={config.rl.micro_batch_size} must divide "
            f"rl.train_batch_size={config.rl.train_batch_size}"
        )
    rl_job.prompt_dataset(config)


# --- 1. sampling ---------------------------------------------------------------------------------


def sample_round(
    config: ml_collections.ConfigDict,
    sampler: Any,
    params: Any,
    prompts: Sequence[dict],
    vocabulary: Any,
    r: int,
    chunks_path: epath.Path,
) -> list[dict]:
    """Samples and grades every prompt in chunks of `rl.prompts_per_step` (the last one padded
    with repeats, dropped before grading counts), appending one line per chunk to `chunks_path`;
    chunks found there are not sampled again. Returns the chunk records in order."""
    rc = config.rl
    per_chunk = rc.prompts_per_step
    num_chunks = math.ceil(len(prompts) / per_chunk)
    done = {row["chunk"]: row for row in read_jsonl(chunks_path, repair=True)}
    sampling = rl_job.sampling_params(rc)
    rng = jax.random.fold_in(jax.random.key(config.seed), r)
    for c in range(num_chunks):
        if c in done:
            continue
        chunk = [prompts[i] for i in range(c * per_chunk, min((c + 1) * per_chunk, len(prompts)))]
        real_rows = len(chunk) * rc.samples_per_prompt
        chunk += [chunk[-1]] * (per_chunk - len(chunk))  # one compiled shape
        sample = rollout.sample_and_grade(
            sampler,
            params,
            chunk,
            vocabulary,
            sampling,
            rc.samples_per_prompt,
            rc.max_prompt_len,
            jax.random.fold_in(rng, c),
            dataset=rl_job.prompt_dataset(config),
            grade_timeout_s=rc.grade_timeout_s,
            rows_per_call=rc.sampler_batch_size,
            grader=rc.grader,
            grade_with_prompt=False,  # the study's EI verifies the generated text alone
        )
        done[c] = chunk_record(c, rollout.truncate_info(sample.info, real_rows))
        if jax.process_index() == 0:
            with chunks_path.open("a") as f:
                f.write(json_line(done[c]))
        print(
            f"[ei] round {r}: chunk {c + 1}/{num_chunks} sampled, "
            f"{done[c]['correct']}/{done[c]['sampled']} correct, {len(done[c]['kept'])} kept",
            file=sys.stderr,
            flush=True,
        )
    return [done[c] for c in range(num_chunks)]


def chunk_record(c: int, info: rollout.RolloutInfo) -> dict:
    """Counts per style (sampled, correct) and the correct samples of one chunk, one of each
    (question, completion) pair (`round_stats` deduplicates the round: a prompt pool may hold a
    question twice)."""
    styles = list(info.styles)
    keep = expert_iteration.select_expert_samples(info.questions, info.texts, info.correct)
    return {
        "chunk": c,
        "sampled": len(styles),
        "correct": int(np.sum(info.correct)),
        "styles": {s: styles.count(s) for s in grading.STYLE_LABELS},
        "styles_correct": {
            s: int(sum(ok for st, ok in zip(styles, info.correct, strict=True) if st == s))
            for s in grading.STYLE_LABELS
        },
        "kept": [
            {"question": info.questions[i], "completion": info.texts[i], "style": styles[i]}
            for i in keep
        ],
    }


def json_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def round_stats(records: Sequence[dict]) -> tuple[list[dict], dict[str, float]]:
    """The round's kept samples, one of each (question, completion) pair over the whole round
    (as the study's `drop_duplicates`), and its sampling row: accuracy, style shares and
    accuracies of every sample, the number kept and each style's share of them."""
    sampled = sum(r["sampled"] for r in records)
    unique = {(k["question"], k["completion"]): k for r in records for k in r["kept"]}
    kept = list(unique.values())
    row = {
        "sampled": float(sampled),
        "accuracy": sum(r["correct"] for r in records) / max(sampled, 1),
        "kept": float(len(kept)),
        "duplicates": float(sum(r["correct"] for r in records) - len(kept)),
    }
    for s in grading.STYLE_LABELS:
        n = sum(r["styles"][s] for r in records)
        row[f"style_share/{s}"] = n / max(sampled, 1)
        if n:
            row[f"style_accuracy/{s}"] = sum(r["styles_correct"][s] for r in records) / n
        row[f"kept_share/{s}"] = sum(k["style"] == s for k in kept) / max(len(kept), 1)
    return kept, row


# --- 2. fine-tuning ------------------------------------------------------------------------------


def sft_length(config: ml_collections.ConfigDict) -> int:
    """Tokens per fine-tuning row: `ei.sft_tokens` (the study: 1024), or prompt + new tokens."""
    return config.ei.sft_tokens or config.rl.max_prompt_len + config.rl.max_new_tokens


@dataclasses.dataclass(frozen=True)
class SFTPlan:
    """`epochs` x `per_epoch` batches of `batch_size` rows of `examples`, in the order of a
    seeded permutation per epoch; the last partial batch of an epoch is dropped."""

    examples: Sequence[dict]
    batch_size: int
    epochs: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    @property
    def num_updates(self) -> int:
        return self.epochs * self.per_epoch

    def rows(self, update: int) -> list[int]:
        epoch, b = divmod(update, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def sft_iterator(plan: SFTPlan, vocabulary: Any, seq_len: int):
    """A checkpointable grain iterator of the plan's batches, tokenised as they are read."""

    def batch(update: int) -> dict[str, np.ndarray]:
        rows = [
            expert_iteration.sft_example(
                vocabulary, plan.examples[i]["question"], plan.examples[i]["completion"], seq_len
            )
            for i in plan.rows(update)
        ]
        return {k: np.stack([row[k] for row in rows]) for k in expert_iteration.SFT_KEYS}

    return iter(grain.MapDataset.range(plan.num_updates).map(batch).to_iter_dataset())


def sft_task(
    config: ml_collections.ConfigDict, model: Transformer, plan: SFTPlan, vocabulary: Any, start
) -> TrainTask:
    """Fine-tuning on the plan as a `TrainTask`: a fresh AdamW state over `plan.num_updates`
    updates, warm-started from `start()`'s parameters (placed by the state's shardings)."""
    rc = config.rl
    tx = OptimConfig(rc.lr, rc.warmup_ratio, rc.min_lr_ratio).make(plan.num_updates)
    seq_len = sft_length(config)

    def warm_start(state: TrainState) -> TrainState:
        return state.replace(params=start(jax.tree.map(lambda x: x.sharding, state.params)))

    return TrainTask(
        init_state=pretrain.make_init_state(model, tx, 8),
        train_step=expert_iteration.make_sft_step(model, tx, rc.micro_batch_size),
        train_iter=sft_iterator(plan, vocabulary, seq_len),
        warm_start=warm_start,
        meta={**config_meta(model.cfg), "algo": "ei_sft"},
        tokens_per_step=rc.train_batch_size * seq_len,
        shown=("train/loss", "train/grad_norm"),
    )


# --- the job -----------------------------------------------------------------------------------


def model_source(config: ml_collections.ConfigDict, workdir: str, rounds: int) -> str:
    """The workdir holding the model after `rounds` finished rounds: the newest round that
    fine-tuned, or `init_from` (a round whose kept samples filled no batch leaves the model it
    started from: with `sft_from="base"` that is `init_from`)."""
    for r in reversed(range(rounds)):
        result = read_json(round_dir(workdir, r) / "round.json") or {}
        if result.get("sft/updates"):
            return str(round_dir(workdir, r))
        if config.ei.sft_from == "base":
            break
    return config.init_from


class ExpertIterationRun:
    """The pieces every round shares: model, sampler, evaluation, prompts and the parameters'
    shardings (those of the fine-tuning state, so a sharded model loads sharded)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        model_cfg, self.vocabulary = rl_job.model_and_vocabulary(config)
        self.mesh = sharding.config_mesh(config.mesh.to_dict())
        cpu.prepare(model_cfg, self.mesh)
        self.model = Transformer(model_cfg)
        self.sampler = rl_job.make_sampler(config, model_cfg, self.vocabulary, self.mesh)
        self.policy_eval = (
            PolicyEval(config, self.sampler, self.vocabulary) if config.eval.per_level else None
        )
        self.prompts = rl_job.load_prompts(config, self.vocabulary)
        shapes = TrainTask(
            init_state=pretrain.make_init_state(self.model, OptimConfig(1.0).make(1), 8),
            train_step=None,
            train_iter=None,
        )
        rules = tuple(map(tuple, config.sharding.rules))
        abstract = abstract_state(shapes, self.mesh, rules, jax.random.key(0))
        self.shardings = jax.tree.map(lambda x: x.sharding, abstract.params)

    def params(self, source: str, shardings: Any = None) -> Any:
        step = (self.config.init_step or None) if source == self.config.init_from else None
        return restore.load_params(source, step, shardings=shardings or self.shardings)[1]

    def evaluate(self, params: Any) -> dict[str, float]:
        return self.policy_eval(params) if self.policy_eval is not None else {}

    def sample(self, r: int) -> tuple[list[dict], dict[str, float]]:
        """Round r's kept samples and sampling row, from `round_<r>.jsonl` once it exists."""
        folder = epath.Path(self.workdir) / "rounds"
        kept_path, stats_path = folder / f"round_{r}.jsonl", folder / f"round_{r}.stats.json"
        if kept_path.exists() and stats_path.exists():
            return read_jsonl(kept_path), read_json(stats_path)
        chunks_path = folder / f"round_{r}.chunks.jsonl"
        params = self.params(model_source(self.config, self.workdir, r))
        records = sample_round(
            self.config, self.sampler, params, self.prompts, self.vocabulary, r, chunks_path
        )
        kept, stats = round_stats(records)
        kept = [{**k, "round": r} for k in kept]
        if jax.process_index() == 0:
            tmp = folder / f"round_{r}.jsonl.tmp"
            tmp.write_text("".join(json_line(k) for k in kept))
            tmp.replace(kept_path)
        write_json(stats_path, stats)
        if jax.process_index() == 0:
            chunks_path.unlink(missing_ok=True)
        return kept, stats

    def fine_tune(self, r: int, kept: list[dict]) -> tuple[Any, dict[str, float]]:
        """Round r's fine-tuning (skipped when the kept samples fill no batch); the parameters
        after it and its row."""
        c = self.config
        plan = SFTPlan(kept, c.rl.train_batch_size, c.rl.epochs, c.seed * 1000 + r)
        row = {"sft/updates": float(plan.num_updates)}
        start = model_source(c, self.workdir, r) if c.ei.sft_from == "last" else c.init_from
        if not plan.num_updates:
            print(
                f"[ei] round {r}: {len(kept)} kept samples fill no batch of "
                f"{c.rl.train_batch_size}; no fine-tuning, the model stays {start}",
                file=sys.stderr,
            )
            return self.params(start), row
        task = sft_task(c, self.model, plan, self.vocabulary, lambda s: self.params(start, s))
        loop = LoopConfig(
            num_steps=plan.num_updates,
            log_every=min(c.train.log_every, plan.num_updates),
            checkpoint_every=c.train.checkpoint_every,
            keep_checkpoints=c.train.keep_checkpoints,
            async_checkpoints=c.train.async_checkpoints,
        )
        folder = str(round_dir(self.workdir, r))
        state = train(
            task,
            loop,
            self.mesh,
            c.sharding.rules,
            folder,
            c.seed,
            config=c,
            label=f"ei round {r}",
            may_change=ROUNDS_MAY_CHANGE,
        )
        losses = [row["train/loss"] for row in read_jsonl(f"{folder}/metrics.jsonl")]
        return state.params, {**row, "sft/loss": losses[-1] if losses else float("nan")}

    def round(self, r: int) -> dict[str, float]:
        kept, stats = self.sample(r)
        params, sft = self.fine_tune(r, kept)
        return {"round": float(r), **stats, **sft, **self.evaluate(params)}


def run_ei(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) `ei.rounds` rounds; finished rounds are skipped."""
    check_config(config)
    rounds = config.ei.rounds
    results = [round_dir(workdir, r) / "round.json" for r in range(rounds)]
    started = (epath.Path(workdir) / "rounds").exists()
    finished = sum(path.exists() for path in results)
    if finished == rounds:
        config.data.vocab = restore.vocab_name(config.init_from)  # as the run records it
    run = None if finished == rounds else ExpertIterationRun(config, workdir)
    workdir_lib.record_run(
        workdir, config, step=finished, may_change=ROUNDS_MAY_CHANGE, label="ei", started=started
    )
    initial = stages.run_stage(
        lambda: run.evaluate(run.params(config.init_from)),
        label="ei",
        index=1,
        total=rounds + 1,
        name="evaluate the initial model",
        result_file=epath.Path(workdir) / "rounds" / "initial_eval.json",
    ).result
    rows = [initial]
    for r, path in enumerate(results):
        rows.append(
            stages.run_stage(
                lambda r=r: run.round(r),
                label="ei",
                index=r + 2,
                total=rounds + 1,
                name=f"round {r + 1} of {rounds}",
                result_file=path,
            ).result
        )
        write_metrics(workdir, rows)
    if jax.process_index() == 0:
        report.plot_rl(workdir, unit="EI round")
    print(
        f"[ei] the model after {rounds} rounds: {model_source(config, workdir, rounds)}",
        file=sys.stderr,
    )


def write_metrics(workdir: str, rows: Sequence[dict]) -> None:
    """Brings `metrics.jsonl` (and TensorBoard) up to `rows`: step 0 the initial evaluation,
    step r + 1 round r; rows logged already are not written twice."""
    logged = {row["step"] for row in read_jsonl(epath.Path(workdir) / "metrics.jsonl", repair=True)}
    missing = [step for step in range(len(rows)) if step not in logged]
    if not missing:
        return
    first = missing[0]
    writer = MetricWriter(
        workdir, resume_step=first - 1 if first else None, enabled=jax.process_index() == 0
    )
    try:
        for step in range(first, len(rows)):
            writer.write(step, rows[step])
    finally:
        writer.close()
