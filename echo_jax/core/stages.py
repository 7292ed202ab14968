"""Resumable stages and the workdirs they own.

Every job is a sequence of stages that each leave their outputs in a workdir, so a rerun of the
same command skips what is done and resumes the rest. One stage's protocol, for every job:

- `run_stage`: skip it if it finished earlier (`done`, or its JSON `result_file` exists), else
  run and time it, with one header line on stderr before and after (`[label] stage i/n: name`);
- `reached_step`: the `done` test of a training stage (its checkpoints reached the last step);
- `check_workdir`: the workdir guard: a workdir belongs to one experiment; a rerun whose settings
  differ from the ones saved there (outside an allow-list of keys that may change) is refused
  with a `ConfigError` naming each differing key with its old and new value (a run's own
  `config.json` and its history are `workdir.record_run`'s);
- `reuse_or_move_aside`: for a stage that reruns when its inputs change (an evaluation after
  more training): its workdir is reused when its saved settings match, else renamed to
  `<workdir>.old<N>` (`move_aside`) so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from echo_jax.core.config import ConfigError
from echo_jax.core.files import read_json, write_json
from echo_jax.core.workdir import describe, differences, plain

# --- skip if done, timing, header lines ----------------------------------------------------------


class StagesFailed(RuntimeError):
    """Some independent stages of a job failed after the others ran (their errors are in the
    job's files); `main` exits 1 with this one line."""


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What `run_stage` did: `result` is `run()`'s value, or a skipped stage's stored result
    (None without a `result_file`); `seconds` its wall time (0 when skipped)."""

    result: Any
    seconds: float
    skipped: bool


def run_stage(
    run: Callable[[], Any],
    *,
    label: str,
    index: int,
    total: int,
    name: str,
    done: bool = False,
    result_file: str | os.PathLike | None = None,
    stream=None,
) -> StageRun:
    """Runs stage `index` of `total` unless it finished earlier; prints
    `[label] stage index/total: name` before it and `...: done in N s` after it, or
    `...: finished earlier, skipped` alone.

    A stage is done when `done` is true or when its `result_file` (a JSON file) exists: then its
    content is the result. Otherwise `run()`'s result is written there (atomically, on process 0)
    once it returns, so the file marks the stage finished.
    """
    stream = stream or sys.stderr
    header = f"[{label}] stage {index}/{total}: {name}"
    result = None
    if result_file is not None and not done:
        result = read_json(result_file)
        done = result is not None
    if done:
        print(f"{header}: finished earlier, skipped", file=stream, flush=True)
        return StageRun(result, 0.0, True)
    print(header, file=stream, flush=True)
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    if result_file is not None:
        write_json(result_file, result)
    print(f"{header}: done in {seconds:.0f} s", file=stream, flush=True)
    return StageRun(result, seconds, False)


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """`workdir/checkpoints` for a run directory; `workdir` itself when it is that folder."""
    path = pathlib.Path(workdir).resolve()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest checkpointed step of a run directory (or of its `checkpoints/`), or None."""
    directory = checkpoint_dir(workdir)
    steps = (
        [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    )
    return max(steps, default=None)


def reached_step(workdir: str | os.PathLike, num_steps: int) -> bool:
    """Whether `workdir` holds a checkpoint of step `num_steps` or later: a training stage of
    `num_steps` steps that finished."""
    step = latest_step(workdir)
    return step is not None and step >= num_steps


# --- the workdir guard ---------------------------------------------------------------------------


def check_workdir(
    workdir: str | os.PathLike,
    current: Mapping | ml_collections.ConfigDict,
    *,
    may_change: Sequence[str] = (),
    filename: str = "config.json",
    what: str = "a run",
    save: bool = True,
) -> None:
    """The workdir guard: refuses to reuse `workdir` for settings other than those a previous
    run saved in `workdir/filename`.

    `current` (a ConfigDict or a JSON-able dict) is compared key by key with the saved file,
    except for the keys matched by `may_change` (see `workdir.differences`); differences raise a
    `ConfigError` naming each changed key with its old and new value. Otherwise (or without a
    saved file) `current` is saved there when `save`, on process 0.
    """
    path = os.path.join(os.fspath(workdir), filename)
    saved = read_json(path)
    if saved is not None:
        changed = differences(saved, current, may_change)
        if changed:
            raise ConfigError(
                f"{workdir} holds {what} with other settings: {describe(changed)}; "
                "use a fresh --workdir"
            )
    if save:
        write_json(path, plain(current), indent=2)


# --- move aside ----------------------------------------------------------------------------------


def move_aside(workdir: str | os.PathLike, *, label: str, why: str) -> str:
    """Renames `workdir` to the first free `<workdir>.old<N>` (N = 1, 2, ...) and says so on
    stderr (`[label] <workdir> held <why>; moved to ...`); returns the new path."""
    workdir = os.fspath(workdir)
    n = 1
    while os.path.exists(f"{workdir}.old{n}"):
        n += 1
    os.replace(workdir, f"{workdir}.old{n}")
    print(f"[{label}] {workdir} held {why}; moved to {workdir}.old{n}", file=sys.stderr)
    return f"{workdir}.old{n}"


def reuse_or_move_aside(
    workdir: str | os.PathLike,
    current: Mapping,
    *,
    filename: str,
    done_file: str,
    label: str,
    why: str = "a run of other settings",
    may_change: Sequence[str] = (),
) -> bool:
    """True if `workdir` holds a finished stage (`done_file` exists) of the settings `current`
    (equal to `workdir/filename`, see `workdir.differences`).

    A started stage of the same settings returns False (it resumes). One of other settings,
    finished or not, is moved aside (`move_aside`), so the stage starts afresh. Single-host.
    """
    saved = read_json(os.path.join(os.fspath(workdir), filename))
    if saved is None:
        return False
    if not differences(saved, current, may_change):
        return os.path.exists(os.path.join(os.fspath(workdir), done_file))
    move_aside(workdir, label=label, why=why)
    return False
