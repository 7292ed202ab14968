"""LM-track jobs started by `echo_jax.main` (one function per `config.kind`)."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from typing import Callable

import jax
import ml_collections

from echo_jax.core import plots, sharding
from echo_jax.core.config import ConfigError, flat_keys, to_json
from echo_jax.core.train_loop import LoopConfig, TrainTask, train
from echo_jax.lm import cpu, pretrain
from echo_jax.lm.data import mixtures, pipeline, vocab
from echo_jax.lm.model import Transformer, config_meta


def build_pretrain_task(config: ml_collections.ConfigDict, mesh) -> TrainTask:
    """Model, optimizer, grain iterator and per-style evaluation for `configs/lm_pretrain.py`."""
    cfg = pretrain.model_config(config)
    vocab_size = vocab.get_vocabulary(config.data.vocab).vocab_size
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.vocab_size} < vocabulary size {vocab_size} "
                          f"of data.vocab={config.data.vocab!r}")
    global_batch = config.train.batch_size
    if global_batch % sharding.batch_divisor(mesh):
        raise ConfigError(f"train.batch_size {global_batch} is not divisible by the "
                          f"{sharding.batch_divisor(mesh)} data x fsdp shards of the mesh")
    cpu.prepare(cfg, mesh)
    model, tx = Transformer(cfg), pretrain.make_optimizer(config.train)
    data = config.data
    train_iter = pipeline.make_train_iterator(
        mixture=data.mixture, seed=config.seed, seq_len=data.seq_len,
        batch_size=global_batch // jax.process_count(), levels=data.levels,
        loss_on=data.loss_on, vocab_name=data.vocab, process_index=jax.process_index(),
        process_count=jax.process_count(), examples_per_style=data.examples_per_style)
    eval_batches = {
        style: pipeline.make_eval_batches(
            style=style, split="validation", seed=config.seed, num_examples=data.eval_examples,
            seq_len=data.seq_len, batch_size=global_batch, levels=data.levels,
            loss_on=data.loss_on, vocab_name=data.vocab)
        for style in mixtures.get_mixture(data.mixture)
    }
    return TrainTask(
        init_state=pretrain.make_init_state(model, tx, data.seq_len),
        train_step=pretrain.make_train_step(model, tx),
        train_iter=train_iter,
        evaluate=pretrain.make_eval_fn(model, eval_batches),
        meta=config_meta(cfg),
        tokens_per_step=global_batch * data.seq_len,
    )


def run_pretrain(config: ml_collections.ConfigDict, workdir: str):
    mesh = sharding.make_mesh(config.mesh.to_dict())
    task = build_pretrain_task(config, mesh)
    state = train(task, LoopConfig.from_config(config.train), mesh, config.sharding.rules,
                  workdir, config.seed, config=config, label="pretrain")
    if jax.process_index() == 0:
        plots.plot_curves(workdir, ["train/loss", "val/loss/"], "pretrain_loss.png",
                          "pretraining loss (per style on validation)")
    return state


def _stage(name: str, index: int, done: bool, run: Callable[[], object]) -> float:
    """Runs one stage of `run_echo_chamber` unless it is done; returns its wall time."""
    header = f"[echo_chamber] stage {index}/4: {name}"
    if done:
        print(f"{header}: finished earlier, skipped", file=sys.stderr, flush=True)
        return 0.0
    print(f"{header}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"{header}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds


# Keys a rerun may change: how often a stage logs and saves, the mesh, and RL's step count
# (RL resumes and the evaluation after it runs again).
_RERUN_MAY_CHANGE = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "async_checkpoints")


def _check_rerun(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A rerun may extend RL or change the evaluation (those stages run again). Another seed,
    pretraining or RL setting would mix two experiments in one workdir: refused."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(to_json(config))
    lookup = lambda tree, key: functools.reduce(
        lambda node, part: node.get(part) if isinstance(node, dict) else None, key.split("."), tree)
    fixed = lambda key: ((key == "seed" or key.startswith(("pretrain.", "rl.")))
                         and key != "rl.train.num_steps" and ".mesh." not in key
                         and key.rsplit(".", 1)[-1] not in _RERUN_MAY_CHANGE)
    changed = [key for key in flat_keys(config)
               if fixed(key) and lookup(saved, key) != lookup(current, key)]
    if changed:
        key = changed[0]
        raise ConfigError(f"{workdir} holds a run with another {key} ({lookup(saved, key)!r}, "
                          f"now {lookup(current, key)!r}); use a fresh --workdir")


def run_echo_chamber(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`configs/echo_chamber.py`: pretrain -> eval_before -> rl -> eval_after -> report.md, each
    stage in its own sub-workdir; returns the report's path."""
    from echo_jax.core.config import save_config
    from echo_jax.lm import eval as eval_lib, report, restore
    from echo_jax.lm.jobs import rl as rl_job

    dirs = {name: os.path.join(workdir, name)
            for name in ("pretrain", "eval_before", "rl", "eval_after")}
    stages = {name: copy.deepcopy(config[block]) for name, block in
              (("pretrain", "pretrain"), ("eval_before", "eval"), ("rl", "rl"),
               ("eval_after", "eval"))}
    for stage in stages.values():
        stage.seed = config.seed
    stages["eval_before"].checkpoint = stages["rl"].init_from = dirs["pretrain"]
    stages["eval_after"].checkpoint = dirs["rl"]
    _check_rerun(config, workdir)
    save_config(config, workdir)

    def pretrained() -> bool:
        try:
            return restore.latest_step(dirs["pretrain"]) >= stages["pretrain"].train.num_steps
        except FileNotFoundError:
            return False

    evaluated = lambda name: eval_lib.reuse_or_move_aside(stages[name], dirs[name])
    seconds = {
        "pretrain": _stage("pretrain", 1, pretrained(),
                           lambda: run_pretrain(stages["pretrain"], dirs["pretrain"])),
        "eval_before": _stage("eval before RL", 2, evaluated("eval_before"),
                              lambda: eval_lib.run_eval(stages["eval_before"],
                                                        dirs["eval_before"])),
        "rl": _stage(f"RL ({stages['rl'].algo})", 3,
                     rl_job.is_finished(dirs["rl"], stages["rl"].train.num_steps),
                     lambda: rl_job.run_rl(stages["rl"], dirs["rl"])),
        "eval_after": _stage("eval after RL", 4, evaluated("eval_after"),
                             lambda: eval_lib.run_eval(stages["eval_after"], dirs["eval_after"])),
    }
    path = report.write_report(workdir, config)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"[echo_chamber] report: {path} ({timing})", file=sys.stderr, flush=True)
    return path
