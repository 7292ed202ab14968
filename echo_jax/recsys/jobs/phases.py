"""The `source_bias_phases` job: phases 1 and 2 of the source-bias study (`recsys/phases.py`),
resumable.

Each (encoder, rho, seed) sub-run of `phases.plan` trains through the shared loop in
`WORKDIR/runs/<name>` and leaves a `result.json`; finished sub-runs are skipped, interrupted ones
resume from their checkpoints. With `phases.retrain=False` (the study's `test.py`) a phase-2
sub-run trains nothing: it scores dev, histories swapped at its rho, under the rho-0 model of the
same encoder and seed, and leaves only its `result.json`. Writes `source_bias.md`, `results.json`
and `plots/phase2.png` into the workdir.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import ml_collections

from echo_jax.core import workdir as workdir_lib
from echo_jax.core.files import write_json
from echo_jax.core.stages import run_stage
from echo_jax.recsys import phases
from echo_jax.recsys.jobs.train import train_and_evaluate

# Besides the usual (`workdir.RESUME_MAY_CHANGE`), a rerun may add or drop sub-runs: each is
# named by its (encoder, rho, seed) and finished ones are kept.
GRID_MAY_CHANGE = (*workdir_lib.RESUME_MAY_CHANGE, "phases.encoders", "phases.rhos", "phases.seeds")


def sub_config(
    config: ml_collections.ConfigDict, encoder: str, rho: float, seed: int
) -> ml_collections.ConfigDict:
    """The `recsys_train` config of one sub-run."""
    sub = ml_collections.ConfigDict(config.to_dict())
    del sub["phases"]
    sub.kind = "recsys_train"
    sub.seed = seed
    sub.model.user_encoder = encoder
    sub.data.aigc_share = float(rho)
    return sub


def start_sub_runs(
    config: ml_collections.ConfigDict, workdir: str, label: str, may_change: tuple[str, ...]
) -> str:
    """Records the run (refusing a changed resume) and returns its item-vector cache folder."""
    started = os.path.isdir(os.path.join(workdir, "runs"))
    workdir_lib.record_run(workdir, config, may_change=may_change, label=label, started=started)
    return config.model.cache_dir or os.path.join(workdir, "item_cache")


def run_sub_runs(workdir: str, label: str, trains: dict[str, Callable[[], dict]]) -> dict:
    """Runs each named sub-run in order as a stage, or reads its `runs/<name>/result.json`
    when it finished earlier; returns name -> result."""
    return {
        name: run_stage(
            train,
            label=label,
            index=index,
            total=len(trains),
            name=name,
            result_file=os.path.join(workdir, "runs", name, "result.json"),
        ).result
        for index, (name, train) in enumerate(trains.items(), start=1)
    }


def run_phases(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or skips) every sub-run, then writes the tables and the phase-2 figure."""
    cache_dir = start_sub_runs(config, workdir, "phases", GRID_MAY_CHANGE)
    trains = {}
    for encoder, rho, seed in phases.plan(config.phases):
        trained_at = rho if config.phases.retrain else 0.0
        trains[phases.run_name(encoder, rho, seed)] = functools.partial(
            train_and_evaluate,
            sub_config(config, encoder, trained_at, seed),
            os.path.join(workdir, "runs", phases.run_name(encoder, trained_at, seed)),
            cache_dir,
            evaluate_in_loop=False,
            label=phases.run_name(encoder, rho, seed),
            eval_aigc_share=rho,
        )
    results = run_sub_runs(workdir, "phases", trains)
    summary = phases.summarise(config.phases, results)
    write_json(os.path.join(workdir, "results.json"), summary)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "source_bias.md"), "w") as f:
            f.write(phases.markdown(summary))
        phases.plot_phase2(summary, os.path.join(workdir, "plots", "phase2.png"))
    return summary
