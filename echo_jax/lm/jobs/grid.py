"""The experiment grid (`configs/echo_grid.py`, kind "echo_grid"): every cell's pretraining ->
evaluation -> RL -> evaluation, then `report.md`, `results.json` and `plots/` (`lm/grid_report`).

Layout of the workdir:
- `pretrain/<mixture>-<size>-s<seed>/` and `eval_before/<same>/`: shared by the cells that start
  from that pretraining run;
- `cells/<mixture>-<size>-<algo>-kl<kl>-s<seed>/rl` and `.../eval_after`: one per cell;
  `.../error.txt` when the cell failed (the others still run; a rerun retries it);
- with `transfer.<name>` blocks (an `lm_eval` config each: GSM8K, MATH-500, AIME, a harder
  synthetic level), `transfer_before/<pretraining>/<name>/` and `cells/<cell>/transfer_after/
  <name>/`: the same model evaluated on other problems before and after RL.

Cells run in a stable order (sweeps by name, a pretraining group's cells together); shard i of n
takes the pretraining groups whose name hashes to i modulo n, so shards never share a stage and
adding a sweep moves no group. Shards may share the workdir (each stage locks its own folder);
each writes the report of what is finished when it ends.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
import time
import traceback
import zlib
from collections.abc import Sequence

import ml_collections

from echo_jax.core import stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.config import ConfigError
from echo_jax.core.train_loop import Preempted
from echo_jax.lm.data import mixtures as mixtures_lib
from echo_jax.lm.jobs import eval as eval_job
from echo_jax.lm.jobs import pretrain as pretrain_job
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import ModelConfig
from echo_jax.lm.rl import algorithm

# a rerun may add sweeps, cells and seeds (a finished cell is kept), shard differently, or change
# how often stages log and save; not change what a cell means (its evaluation included: finished
# cells keep theirs)
GRID_MAY_CHANGE = (
    *(p for p in workdir_lib.RESUME_MAY_CHANGE if p not in ("eval.*", "*init_from")),
    "grid.*",
    "sweeps.*",
    "transfer*",  # a changed evaluation is moved aside and rerun; a new one runs
    "*.mesh.*",
    "*.async_checkpoints",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    mixture: str
    size: str
    algo: str
    kl_coef: float
    seed: int

    @property
    def pretraining(self) -> str:
        return f"{self.mixture}-{self.size}-s{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.mixture}-{self.size}-{self.algo}-kl{self.kl_coef:g}-s{self.seed}"


def cells(config: ml_collections.ConfigDict) -> list[Cell]:
    """Every cell of the union of the sweeps, once, grouped by pretraining run (in the order the
    groups first appear), in sweep order within a group."""
    ordered = []
    for sweep in config.sweeps.values():
        for mixture, size, algo, kl, seed in itertools.product(
            sweep.mixtures, sweep.sizes, sweep.algos, sweep.kl_coefs, sweep.seeds
        ):
            ordered.append(Cell(mixture, size, algo, float(kl), int(seed)))
    ordered = list(dict.fromkeys(ordered))
    groups = list(dict.fromkeys(c.pretraining for c in ordered))
    return sorted(ordered, key=lambda c: groups.index(c.pretraining))


def shard(all_cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """The cells of the pretraining groups whose name hashes to `index` modulo `count`."""
    return [c for c in all_cells if zlib.crc32(c.pretraining.encode()) % count == index]


def check_config(config: ml_collections.ConfigDict) -> list[Cell]:
    g = config.grid
    if not 0 <= g.shard < g.num_shards:
        raise ConfigError(f"grid.shard must be in [0, {g.num_shards}), got {g.shard}")
    if not config.sweeps:
        raise ConfigError("sweeps is empty: the grid has no cells")
    grid = cells(config)
    for cell in grid:
        if cell.mixture not in mixtures_lib.MIXTURES:
            raise ConfigError(
                f"unknown mixture {cell.mixture!r}; known: {sorted(mixtures_lib.MIXTURES)}"
            )
        if cell.size not in config.sizes:
            raise ConfigError(f"unknown size {cell.size!r}; sizes: {sorted(config.sizes)}")
        if cell.algo not in algorithm.names() or cell.algo not in config.algorithms:
            raise ConfigError(
                f"unknown algo {cell.algo!r}; the grid's: {sorted(config.algorithms)}"
            )
    for size in {c.size for c in grid}:  # a model mistake fails now, not hours in
        stage = stage_configs(config, next(c for c in grid if c.size == size), "")["pretrain"][1]
        ModelConfig(**stage.model.to_dict())
    return grid


def stage_configs(config: ml_collections.ConfigDict, cell: Cell, workdir: str) -> dict:
    """stage -> (its workdir, its config) for one cell."""
    dirs = {
        "pretrain": os.path.join(workdir, "pretrain", cell.pretraining),
        "eval_before": os.path.join(workdir, "eval_before", cell.pretraining),
        "rl": os.path.join(workdir, "cells", cell.name, "rl"),
        "eval_after": os.path.join(workdir, "cells", cell.name, "eval_after"),
    }
    pretrain = copy.deepcopy(config.pretrain)
    size = config.sizes[cell.size]
    for key in ("d_model", "n_layers", "n_heads", "mlp_dim"):
        pretrain.model[key] = size[key]
    pretrain.train.lr = size.lr
    pretrain.data.mixture = cell.mixture
    rl = copy.deepcopy(config.rl)
    for block, values in config.algorithms[cell.algo].items():
        for key, value in values.items():
            rl[block][key] = value
    rl.algo, rl.rl.kl_coef, rl.init_from = cell.algo, cell.kl_coef, dirs["pretrain"]
    before, after = copy.deepcopy(config.eval), copy.deepcopy(config.eval)
    before.checkpoint, after.checkpoint = dirs["pretrain"], dirs["rl"]
    configs = {"pretrain": pretrain, "eval_before": before, "rl": rl, "eval_after": after}
    for name, evaluation in config.get("transfer", {}).items():
        for when, model in (("before", "pretrain"), ("after", "rl")):
            stage = f"transfer_{when}:{name}"
            folder = (
                os.path.join(workdir, "transfer_before", cell.pretraining, name)
                if when == "before"
                else os.path.join(workdir, "cells", cell.name, "transfer_after", name)
            )
            dirs[stage], configs[stage] = folder, copy.deepcopy(evaluation)
            configs[stage].checkpoint = dirs[model]
    for block in configs.values():
        block.seed = cell.seed
        with block.unlocked():
            block.resume = copy.deepcopy(config.resume)
    return {name: (dirs[name], configs[name]) for name in dirs}


def _order(stage: str) -> int:
    """Pretraining and what evaluates it, then RL and what evaluates it."""
    return 0 if stage in ("pretrain", "eval_before") or stage.startswith("transfer_before:") else 1


def run_cell(config: ml_collections.ConfigDict, cell: Cell, workdir: str) -> None:
    """The cell's stages, each skipped when finished (the shared ones by an earlier cell)."""
    stages_ = stage_configs(config, cell, workdir)
    runners = {"pretrain": pretrain_job.run_pretrain, "rl": rl_job.run_rl}
    steps = {
        name: (runners.get(name, eval_job.run_eval), "train" if name in runners else None)
        for name in sorted(stages_, key=_order)
    }
    for i, (name, (run, trained)) in enumerate(steps.items(), 1):
        folder, stage = stages_[name]
        done = (
            stages.reached_step(folder, stage.train.num_steps)
            if trained
            else eval_job.reuse_or_move_aside(stage, folder)
        )
        stages.run_stage(
            lambda run=run, stage=stage, folder=folder: run(stage, folder),
            label=f"grid {cell.name}",
            index=i,
            total=len(steps),
            name=name,
            done=done,
        )


def shared_stages_done(config: ml_collections.ConfigDict, cell: Cell, workdir: str) -> bool:
    """Whether the cell's pretraining and its evaluations (shared by its group) are finished."""
    found = stage_configs(config, cell, workdir)
    pretrain_dir, pretrain = found["pretrain"]
    evals = [f for name, (f, _) in found.items() if name != "pretrain" and _order(name) == 0]
    trained = stages.reached_step(pretrain_dir, pretrain.train.num_steps)
    return trained and all(os.path.exists(os.path.join(f, "eval.json")) for f in evals)


def cell_finished(workdir: str, cell: Cell, transfer: Sequence[str] = ()) -> bool:
    """Whether the cell's evaluation after RL (and each `transfer` one) is written."""
    base = os.path.join(workdir, "cells", cell.name)
    folders = ["eval_after", *(os.path.join("transfer_after", name) for name in transfer)]
    return all(os.path.exists(os.path.join(base, f, "eval.json")) for f in folders)


def run_grid(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs this shard's unfinished cells, then writes the report from every finished cell;
    returns the report's path. A failing cell is reported and the rest go on; `StagesFailed`
    at the end names the failed ones (a preemption stops the grid at once)."""
    from echo_jax.lm import grid_report  # matplotlib only where a report is written

    grid = check_config(config)
    workdir_lib.record_run(
        workdir,
        config,
        may_change=GRID_MAY_CHANGE,
        label="grid",
        started=os.path.isdir(os.path.join(workdir, "pretrain")),
    )
    mine = [] if config.grid.report_only else shard(grid, config.grid.shard, config.grid.num_shards)
    transfer = list(config.get("transfer", {}))
    todo = [c for c in mine if not cell_finished(workdir, c, transfer)]
    print(
        f"[grid] {len(grid)} cells; this shard {len(mine)}, {len(mine) - len(todo)} finished "
        f"earlier",
        file=sys.stderr,
        flush=True,
    )
    failed, broken_groups, start = [], set(), time.perf_counter()
    for i, cell in enumerate(todo, 1):
        elapsed = time.perf_counter() - start
        eta = f", ETA {elapsed / (i - 1) * (len(todo) - i + 1) / 60:.0f} min" if i > 1 else ""
        print(f"[grid] cell {i}/{len(todo)}: {cell.name}{eta}", file=sys.stderr, flush=True)
        error = os.path.join(workdir, "cells", cell.name, "error.txt")
        if cell.pretraining in broken_groups:  # its shared stages failed once: not again
            failed.append(cell.name)
            print(f"[grid] cell {cell.name} skipped: {cell.pretraining} failed", file=sys.stderr)
            continue
        try:
            run_cell(config, cell, workdir)
        except Preempted:
            raise
        except Exception as e:  # noqa: BLE001 - one cell's failure is reported, the rest run
            failed.append(cell.name)
            os.makedirs(os.path.dirname(error), exist_ok=True)
            with open(error, "w") as f:
                f.write(traceback.format_exc())
            print(f"[grid] cell {cell.name} failed: {e!r} (see {error})", file=sys.stderr)
            if not shared_stages_done(config, cell, workdir):
                broken_groups.add(cell.pretraining)
        else:
            if os.path.exists(error):
                os.remove(error)
    path = grid_report.write(workdir, config, grid)
    print(f"[grid] report: {path}", file=sys.stderr, flush=True)
    if failed:
        raise stages.StagesFailed(
            f"{len(failed)} of {len(todo)} cells failed ({', '.join(failed)}); each has its "
            f"traceback in {workdir}/cells/<cell>/error.txt, the report has the others; a "
            "rerun retries them"
        )
    return path
