"""Entry point for every run:

    python -m echo_jax.main --config=configs/<family>.py:<variant> --workdir=DIR [--config.a.b=v]

Dispatches on `config.kind`, with the workdir locked for the run (`core.workdir`). Exit status:

  2    a mistake the user can fix (a config key or value, a data file, a workdir, a checkpoint):
       one line on stderr, nothing written (`--verbose` or ECHO_JAX_VERBOSE=1 adds the traceback);
  1    the run stopped: a NaN loss or a failed checkpoint save, one line naming the step and the
       last good checkpoint;
  143  SIGTERM (preemption): the current step was checkpointed; rerun to resume.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # seqio imports TensorFlow; keep its logs quiet

from absl import app, flags, logging
from ml_collections import config_flags

from echo_jax.core.config import ConfigError, parse_flags_with_clear_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", lock_config=True, help_string="configs/X.py:variant"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed when it exists).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a one-line error too.")


# config.kind -> (module, function); imported lazily so one track's imports stay out of the other
_RUNNERS = {
    "lm_pretrain": ("echo_jax.lm.jobs.pretrain", "run_pretrain"),
    "lm_eval": ("echo_jax.lm.jobs.eval", "run_eval"),
    "lm_rl": ("echo_jax.lm.jobs.rl", "run_rl"),
    "lm_ei": ("echo_jax.lm.jobs.ei_rounds", "run_ei"),
    "echo_chamber": ("echo_jax.lm.jobs.echo_chamber", "run_echo_chamber"),
    "echo_grid": ("echo_jax.lm.jobs.grid", "run_grid"),
    "recsys_train": ("echo_jax.recsys.jobs.train", "run_train"),
    "source_bias_phases": ("echo_jax.recsys.jobs.phases", "run_phases"),
    "source_bias_study": ("echo_jax.recsys.jobs.study", "run_study"),
    "source_bias_mechanism": ("echo_jax.recsys.jobs.mechanism", "run_mechanism"),
}


# jobs whose workdir several processes share (a grid's shards): each stage locks its own folder
_SHARED_WORKDIR_KINDS = ("echo_grid",)


def _runner_path(kind: str) -> tuple[str, str]:
    if kind not in _RUNNERS:
        raise ConfigError(f"unknown config.kind {kind!r}")
    return _RUNNERS[kind]


def _runner(kind: str):
    module, function = _runner_path(kind)
    return getattr(importlib.import_module(module), function)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("echo_jax: error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("ECHO_JAX_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize()
    from echo_jax.core.config import validate
    from echo_jax.core.workdir import lock_workdir

    config, workdir = _CONFIG.value, _WORKDIR.value
    logging.set_verbosity(logging.WARNING)  # progress lines are printed; Orbax's INFO is noise
    try:
        validate(config)  # values, kind and workdir first: a mistake fails before jax loads
        _runner_path(config.kind)
        if config.kind in _SHARED_WORKDIR_KINDS:
            _run(config, workdir)
        else:
            with lock_workdir(workdir):
                _run(config, workdir)
    except ConfigError as e:
        _fail(f"echo_jax: error: {e}", 2)


def _run(config, workdir: str) -> None:
    from echo_jax.core.checkpoint import CheckpointSaveError
    from echo_jax.core.stages import StagesFailed
    from echo_jax.core.train_loop import NonFiniteLossError, Preempted

    try:
        _runner(config.kind)(config, workdir)
    except (NonFiniteLossError, CheckpointSaveError, StagesFailed) as e:
        _fail(f"echo_jax: error: {e}", 1)
    except Preempted as e:
        _fail(f"echo_jax: {e}", 143, show_traceback=False)


def _fail(line: str, status: int, show_traceback: bool = True) -> None:
    if show_traceback and (_VERBOSE.value or os.environ.get("ECHO_JAX_VERBOSE") == "1"):
        traceback.print_exc()
    print(line, file=sys.stderr)
    sys.exit(status)


def run() -> None:
    app.run(main, flags_parser=parse_flags_with_clear_errors)


if __name__ == "__main__":
    run()
