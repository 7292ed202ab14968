"""The training loop: the one place where gradient steps are jitted, for every job.

A job describes its training as a `TrainTask` (init, pure step, data iterator, evaluation); the
loop owns sharding, jit with donation, resume-by-default from Orbax checkpoints, logging, the
NaN guard and preemption (SIGTERM) handling.

A step is `host_stage` (optional: host-side work that needs the current state, e.g. RL's
sample -> sandbox-grade, which turns the iterator's batch into the step's batch) followed by the
pure jitted `train_step`. Pretraining and the recommender have no host stage.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from echo_jax.core import sharding
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.checkpoint import Checkpointer, tree_signature
from echo_jax.core.metrics import MetricWriter, Progress

State = Any
Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
    """Raised when a logged loss is NaN or Inf; no checkpoint is written after it."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was saved."""


@dataclasses.dataclass
class TrainTask:
    """What a track hands to the loop.

    init_state: rng -> state whose parameters carry `nn.LogicallyPartitioned` annotations.
    train_step: pure `(state, batch, rng) -> (state, metrics)`; metrics must contain "loss".
    train_iter: a checkpointable iterator (grain's, or any with `get_state`/`set_state`).
    evaluate: optional host-driven evaluation `state -> {name: scalar}`.
    meta: what a resumed checkpoint must agree with (e.g. the model config).
    warm_start: on a fresh run (not a resume), `state -> state` before the first step, e.g.
      pretrained weights restored into the sharded state.
    host_stage: `(state, item, rng) -> (batch, host_metrics)`: turns the iterator's item into
      the step's host-local numpy batch using the current state (RL: sample and grade). With a
      host stage the loop also logs `time/train_step`, the seconds of the jitted step.
    evaluate_at_start: also evaluate before the first step (logged as step 0).
    metric_prefix: prepended to the train step's and host stage's metric names.
    shown: the metrics of a progress line (default: the first six).
    """

    init_state: Callable[[jax.Array], State]
    train_step: Callable[[State, Any, jax.Array], tuple[State, dict]]
    train_iter: Iterator[Any]
    evaluate: Callable[[State], Mapping[str, float]] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    tokens_per_step: int = 0
    warm_start: Callable[[State], State] | None = None
    host_stage: Callable[[State, Any, jax.Array], tuple[Batch, dict[str, float]]] | None = None
    evaluate_at_start: bool = False
    metric_prefix: str = "train/"
    shown: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_checkpoints: int = 0  # also save and keep this many at log-spaced steps (the study: 15)

    def kept_steps(self) -> tuple[int, ...]:
        """The `log_checkpoints` log-spaced steps in [1, num_steps] (fewer where they round to
        the same step): a curve of any metric against the step on a log axis."""
        if not self.log_checkpoints:
            return ()
        steps = np.geomspace(1, self.num_steps, self.log_checkpoints)
        return tuple(sorted({int(round(x)) for x in steps}))

    @classmethod
    def from_config(cls, train_config: Any) -> LoopConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in train_config.items() if k in names})


class SigtermFlag:
    """Turns SIGTERM (TPU preemption) into a flag the loop checks after every step."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def abstract_state(task: TrainTask, mesh: Mesh, rules, rng: jax.Array) -> Any:
    """The state's shapes, dtypes and shardings (from its logical axes), allocating nothing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        boxed = jax.eval_shape(task.init_state, rng)
        state_sharding = sharding.logical_to_sharding(boxed, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        state_sharding,
    )


def initial_state(task: TrainTask, mesh: Mesh, rules, rng: jax.Array) -> tuple[State, Any]:
    """Builds the sharded initial state; returns it with its abstract (shape+sharding) twin."""
    abstract = abstract_state(task, mesh, rules, rng)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        init = jax.jit(lambda r: nn.meta.unbox(task.init_state(r)), out_shardings=state_sharding)
        state = init(rng)
    return state, abstract


def jit_train_step(task: TrainTask, mesh: Mesh, rules, abstract_state: Any) -> Callable:
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract_state)

    def step(state, batch, rng):
        with nn.logical_axis_rules(list(rules)):
            return task.train_step(state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(state_sharding, None, None),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def _check_finite(pending: list[tuple[int, dict]]) -> None:
    for step, metrics in pending:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {step}")


def _mean_metrics(pending: list[tuple[int, dict]], prefix: str) -> dict[str, float]:
    """Each metric's mean over the steps that report it (a host stage may omit some)."""
    keys = dict.fromkeys(k for _, m in pending for k in m)
    return {f"{prefix}{k}": float(np.mean([m[k] for _, m in pending if k in m])) for k in keys}


def _shown(row: Mapping[str, Any], keys: Sequence[str]) -> Mapping[str, Any]:
    if not keys:
        return row
    return {k: row[k] for k in (*keys, "perf/steps_per_s", "perf/tokens_per_s") if k in row}


def train(
    task: TrainTask,
    loop: LoopConfig,
    mesh: Mesh,
    rules,
    workdir: str,
    seed: int,
    config: Any = None,
    label: str = "train",
    may_change: Sequence[str] = workdir_lib.RESUME_MAY_CHANGE,
) -> State:
    """Trains `task` to `loop.num_steps`, resuming from the newest intact checkpoint in
    `workdir/checkpoints`, with the workdir locked (`workdir.lock_workdir`).

    `config` (a ConfigDict) is recorded (`workdir.record_run`: `config.json` on a fresh run, the
    history on a resume, refused outside `may_change`) once the checkpoint, if any, is known to
    be compatible, so a refused resume leaves the workdir untouched.
    """
    with workdir_lib.lock_workdir(workdir):
        return _train(task, loop, mesh, rules, workdir, seed, config, label, may_change)


def _train(task, loop, mesh, rules, workdir, seed, config, label, may_change) -> State:
    init_rng, loop_rng = jax.random.split(jax.random.key(seed))
    state, abstract = initial_state(task, mesh, rules, init_rng)
    is_chief = jax.process_index() == 0
    kept_steps = loop.kept_steps()
    ckpt = Checkpointer(
        f"{workdir}/checkpoints",
        keep=loop.keep_checkpoints,
        async_save=loop.async_checkpoints,
        keep_steps=kept_steps,
    )
    try:
        meta = {**task.meta, "seed": seed, "signature": tree_signature(abstract)}
        started = ckpt.latest_step() is not None
        if config is not None:  # a refused resume touches nothing, damaged checkpoints included
            workdir_lib.check_run(workdir, config, may_change=may_change, started=started)
        start, restored = ckpt.restore_latest(abstract, task.train_iter, meta, label)
        if config is not None:
            workdir_lib.record_run(
                workdir, config, step=start, may_change=may_change, label=label, started=started
            )
    except BaseException:
        ckpt.abandon()
        raise
    if start:
        state = restored
        print(f"[{label}] resumed from {ckpt.directory} at step {start}", file=sys.stderr)
    elif task.warm_start is not None:
        with jax.set_mesh(mesh):
            state = task.warm_start(state)
    writer = MetricWriter(workdir, resume_step=start or None, enabled=is_chief)
    progress = Progress(loop.num_steps, start, task.tokens_per_step, label)
    show = lambda step, row: progress.show(step, _shown(row, task.shown))
    step_fn = jit_train_step(task, mesh, rules, abstract)
    step, pending = start, []
    failed = True
    try:
        with SigtermFlag() as sigterm, jax.set_mesh(mesh):
            if task.evaluate and task.evaluate_at_start and start == 0:
                show(0, writer.write(0, task.evaluate(state)))
            while step < loop.num_steps:
                item, rng = next(task.train_iter), jax.random.fold_in(loop_rng, step)
                host_metrics = {}
                if task.host_stage is not None:
                    stage_rng, rng = jax.random.split(rng)
                    item, host_metrics = task.host_stage(state, item, stage_rng)
                batch = sharding.shard_batch(item, mesh)
                started = time.perf_counter()
                state, metrics = step_fn(state, batch, rng)
                if task.host_stage is not None:  # the next host stage waits for it anyway
                    jax.block_until_ready(metrics)
                    host_metrics["time/train_step"] = time.perf_counter() - started
                step += 1
                ckpt.raise_if_save_failed()  # a background save failed: stop now, not later
                pending.append((step, {**metrics, **host_metrics}))
                done = step == loop.num_steps
                save = (
                    done
                    or step % loop.checkpoint_every == 0
                    or step in kept_steps
                    or sigterm.raised
                )
                log = done or step % loop.log_every == 0
                evaluate = task.evaluate and (
                    done or (loop.eval_every and step % loop.eval_every == 0)
                )
                if save or log:
                    pending = jax.device_get(pending)
                    _check_finite(pending)
                row = {}
                if log:
                    row = {**_mean_metrics(pending, task.metric_prefix), **progress.rates(step)}
                    pending = []
                if evaluate:
                    row.update(task.evaluate(state))
                if row:
                    show(step, writer.write(step, row))
                if save:
                    ckpt.save(step, state, task.train_iter, meta)
                if sigterm.raised:
                    ckpt.wait()
                    raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {ckpt.directory}")
        failed = False
    except NonFiniteLossError as e:
        ckpt.wait()
        raise NonFiniteLossError(
            f"{e}; stopped. Last good checkpoint: {ckpt.last_good()}"
        ) from None
    finally:
        writer.close()
        if failed:  # the error in flight is the one to report
            ckpt.abandon()
        else:
            ckpt.close()
    return state
