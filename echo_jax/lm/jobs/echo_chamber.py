"""The `echo_chamber` job (`configs/echo_chamber.py`), the main one: pretrain -> eval_before -> rl
-> eval_after -> `report.md`, each stage in its own sub-workdir, each resumable.

A rerun skips the finished stages. It may extend RL (`rl.train.num_steps`): RL resumes and the
evaluation after it runs again, the old one moved aside to `eval_after.old<N>`; it may change the
evaluation, how often a stage logs and saves, and the meshes. Another seed, pretraining or RL
setting would mix two experiments in one workdir: refused (`check_rerun`).
"""

from __future__ import annotations

import copy
import os
import sys

import ml_collections

from echo_jax.core import stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.lm import report
from echo_jax.lm.jobs import eval as eval_job
from echo_jax.lm.jobs import pretrain as pretrain_job
from echo_jax.lm.jobs import rl as rl_job

STAGES = ("pretrain", "eval_before", "rl", "eval_after")
# The keys of the config a rerun may change (`fnmatch` patterns; see `check_rerun`).
RERUN_MAY_CHANGE = (
    "kind",
    "variant",
    "eval.*",
    "rl.train.num_steps",
    "*.mesh.*",
    "*.log_every",
    "*.eval_every",
    "*.checkpoint_every",
    "*.keep_checkpoints",
    "*.async_checkpoints",
)


def check_rerun(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir guard of the job (`workdir.record_run`): `ConfigError` if `workdir` holds a
    run started with other settings outside `RERUN_MAY_CHANGE` (unless `resume.allow_changes`);
    else records `config` (`config.json`, or a line of `config_history.jsonl`)."""
    started = stages.latest_step(os.path.join(workdir, "pretrain")) is not None
    workdir_lib.record_run(
        workdir, config, may_change=RERUN_MAY_CHANGE, label="echo_chamber", started=started
    )


def stage_configs(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[dict[str, str], dict[str, ml_collections.ConfigDict]]:
    """(stage -> its sub-workdir, stage -> its config): each stage's block of `config`, with the
    job's seed and the checkpoints the later stages start from."""
    dirs = {name: os.path.join(workdir, name) for name in STAGES}
    configs = {
        name: copy.deepcopy(config[block])
        for name, block in (
            ("pretrain", "pretrain"),
            ("eval_before", "eval"),
            ("rl", "rl"),
            ("eval_after", "eval"),
        )
    }
    for stage in configs.values():
        stage.seed = config.seed
        with stage.unlocked():  # the job's one `resume` block is every stage's
            stage.resume = copy.deepcopy(config.resume)
    configs["eval_before"].checkpoint = configs["rl"].init_from = dirs["pretrain"]
    configs["eval_after"].checkpoint = dirs["rl"]
    return dirs, configs


def run_echo_chamber(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs (or skips) the four stages, then writes the report; returns its path."""
    dirs, configs = stage_configs(config, workdir)
    check_rerun(config, workdir)

    def stage(index: int, name: str, title: str, run, done: bool) -> float:
        return stages.run_stage(
            lambda: run(configs[name], dirs[name]),
            label="echo_chamber",
            index=index,
            total=len(STAGES),
            name=title,
            done=done,
        ).seconds

    def trained(name: str) -> bool:
        return stages.reached_step(dirs[name], configs[name].train.num_steps)

    def evaluated(name: str) -> bool:
        return eval_job.reuse_or_move_aside(configs[name], dirs[name])

    seconds = {
        "pretrain": stage(
            1, "pretrain", "pretrain", pretrain_job.run_pretrain, trained("pretrain")
        ),
        "eval_before": stage(
            2, "eval_before", "eval before RL", eval_job.run_eval, evaluated("eval_before")
        ),
        "rl": stage(3, "rl", f"RL ({configs['rl'].algo})", rl_job.run_rl, trained("rl")),
        "eval_after": stage(
            4, "eval_after", "eval after RL", eval_job.run_eval, evaluated("eval_after")
        ),
    }
    path = report.write_report(workdir, config)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"[echo_chamber] report: {path} ({timing})", file=sys.stderr, flush=True)
    return path
