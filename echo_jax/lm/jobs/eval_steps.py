"""`lm_eval` with `all_checkpoints=True`: every checkpoint of a run evaluated, each as its own
resumable `lm_eval` in `WORKDIR/step_<n>/`, then one curve per metric against the step (log x):
`WORKDIR/steps.json` and `WORKDIR/plots/by_step.png`. With the log-spaced checkpoints an RL run
keeps (`train.log_checkpoints`, the study's 15), this is the study's evaluation over training."""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from echo_jax.core import stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.checkpoint import complete_steps
from echo_jax.core.config import MissingFileError
from echo_jax.core.files import write_json
from echo_jax.core.plots import plt, save_figure
from echo_jax.lm import grading, restore

STEPS_FILE = "steps.json"


def curves(results: dict[int, dict[str, Any]]) -> dict[str, list]:
    """step -> eval.json as metric -> values in step order: greedy pass@1, every pass@k and
    maj@k, and each style's share of the sampled (greedy when unsampled) completions."""
    steps = sorted(results)
    out: dict[str, list] = {"step": steps}
    out["greedy_pass@1"] = [results[s]["greedy_pass@1"] for s in steps]
    for family in ("pass@k", "maj@k"):
        for k in results[steps[0]][family]:
            out[f"{family.split('@')[0]}@{k}"] = [results[s][family][k] for s in steps]
    for style in grading.STYLE_LABELS:
        which = "sampled" if results[steps[0]]["num_samples"] else "greedy"
        out[f"share/{style}"] = [results[s]["styles"][which][style]["share"] for s in steps]
    return out


def plot(by_step: dict[str, list], workdir: str, title: str) -> str:
    fig, (accuracy, shares) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = np.maximum(np.asarray(by_step["step"]), 1)  # a step-0 checkpoint sits at x = 1
    for key, values in by_step.items():
        if key == "step":
            continue
        ax = shares if key.startswith("share/") else accuracy
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", label=key)
    for ax, name in ((accuracy, "accuracy"), (shares, "style share")):
        ax.set_xscale("log")
        ax.set_xlabel("checkpoint step")
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, workdir, "by_step.png")


def run_eval_steps(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
    from echo_jax.lm.jobs.eval import EVAL_MAY_CHANGE, RESULT_FILE, run_eval  # this extends it

    directory = restore.checkpoint_dir(config.checkpoint)
    steps = complete_steps(directory)
    if not steps:
        raise MissingFileError(f"no checkpoint found in {directory}")
    workdir_lib.record_run(workdir, config, may_change=EVAL_MAY_CHANGE, label="eval")
    results = {}
    for index, step in enumerate(steps, start=1):
        sub = copy.deepcopy(config)
        sub.checkpoint_step, sub.all_checkpoints = step, False
        step_dir = os.path.join(workdir, f"step_{step}")
        results[step] = stages.run_stage(
            lambda sub=sub, step_dir=step_dir: run_eval(sub, step_dir),
            label="eval",
            index=index,
            total=len(steps),
            name=f"checkpoint step {step}",
            result_file=os.path.join(step_dir, RESULT_FILE),
        ).result
    by_step = curves(results)
    write_json(os.path.join(workdir, STEPS_FILE), by_step)
    if jax.process_index() == 0:
        plot(by_step, workdir, config.dataset)
    return by_step
