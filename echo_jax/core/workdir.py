"""A workdir belongs to one run: an OS lock while a process uses it, and the record of the config
it was started with and every resume since.

- `lock_workdir`: creates the workdir and holds an exclusive `flock` on `<workdir>/.lock` for
  the life of the run. A second process on the same workdir gets a `ConfigError` naming the
  holder's pid and host and writes nothing. The kernel drops the lock when its holder dies
  (kill -9 included), so a stale lock file never blocks a rerun. Reentrant within a process (the
  job and the training loop both take it). Local paths only: a bucket (`gs://`) is not locked.
- `record_run`: `config.json` is the config the run was started with and never changes; every
  later start in the same workdir (a resume) appends the resolved config, the step it took effect
  and what changed to `config_history.jsonl`. A resume that changes a key outside `may_change`
  (cadences, paths, meshes, the number of steps, `eval.*`) is refused, naming every changed key
  with its old and new value, unless `resume.allow_changes` is set: then the change is recorded
  and announced on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from echo_jax.core.config import ConfigError
from echo_jax.core.files import read_json, read_jsonl, write_json

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# What a resume may change without `resume.allow_changes`: how long and how often, where, on
# which devices, and the evaluation; not what is trained or how (`fnmatch` patterns).
RESUME_MAY_CHANGE = (
    "variant",
    "train.num_steps",
    "*log_every",
    "*eval_every",
    "*checkpoint_every",
    "*keep_checkpoints",
    "*async_checkpoints",
    "eval.*",
    "mesh.*",
    "*.mesh.*",
    "sharding.*",
    "*.sharding.*",
    "*cache_dir",
    "*minilm_dir",
    "*init_from",
    "*sampler_batch_size",
    "*chunk_prompts",
    "*kernels",
    "*kernel_overrides",
)


# --- the lock ------------------------------------------------------------------------------------

_held: dict[str, tuple[int, int]] = {}  # real path -> (fd, depth): this process's locks


def _is_local(path: str) -> bool:
    return "://" not in path


def ensure_workdir(workdir: str | os.PathLike) -> str:
    """Creates `workdir` (and its parents); `ConfigError` in one line when it cannot be a
    workdir: an existing file, an unwritable or read-only place, a name too long."""
    path = os.fspath(workdir)
    if not _is_local(path):
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if e.errno == errno.ENAMETOOLONG:
            reason += " (at most 255 characters per path component)"
        raise ConfigError(f"cannot use workdir {path}: {reason}") from None
    return path


def _process_index() -> int:
    """jax's process index, 0 when jax is not loaded (a multi-host run initialises it first)."""
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `<workdir>/.lock` (see the module docstring) on process 0; creates the workdir, and
    removes it again when the run it was created for wrote nothing else (a refused start)."""
    path = os.fspath(workdir)
    created = _is_local(path) and not os.path.exists(path)
    ensure_workdir(path)
    if not _is_local(path) or _process_index() != 0:
        yield
        return
    key = os.path.realpath(path)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        _held[key] = (_acquire(os.path.join(path, LOCK_FILE)), 1)
    try:
        yield
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            if created and os.listdir(path) == [LOCK_FILE]:  # still locked while removed
                os.remove(os.path.join(path, LOCK_FILE))
                os.rmdir(path)
            os.close(fd)  # releases the flock; the file stays (its content is the last holder)


def _acquire(lock_path: str) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"workdir {os.path.dirname(lock_path)} is in use by {holder} (lock: {lock_path}); "
            "wait for it to finish or use another --workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


# --- the config record ---------------------------------------------------------------------------


def plain(tree: Mapping | ml_collections.ConfigDict) -> dict:
    """A config or dict as it comes back from a JSON file: tuples as lists, other objects as str."""
    if isinstance(tree, ml_collections.ConfigDict):
        tree = tree.to_dict()
    return json.loads(json.dumps(tree, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def differences(
    saved: Mapping, current: Mapping, may_change: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every key (sorted) whose value differs,
    except the keys matched by a `may_change` pattern (`fnmatch`: `eval.*`, `*.log_every`); a key
    missing on one side has the value None."""
    old, new = _flatten(plain(saved)), _flatten(plain(current))
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not any(fnmatch.fnmatchcase(key, pattern) for pattern in may_change)
    ]


def describe(changes: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, old, new in changes)


def _without_resume_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "resume"}


def effective_config(workdir: str | os.PathLike) -> dict | None:
    """The config the run in `workdir` runs with now: the newest `config_history.jsonl` entry,
    else `config.json`; None for a workdir without either."""
    history = read_jsonl(os.path.join(os.fspath(workdir), HISTORY_FILE), repair=True)
    if history:
        return history[-1]["config"]
    return read_json(os.path.join(os.fspath(workdir), CONFIG_FILE))


def record_run(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    step: int | None = None,
    may_change: Sequence[str] = RESUME_MAY_CHANGE,
    label: str = "run",
) -> None:
    """Records a start of `config` in `workdir` (module docstring). On a fresh workdir writes
    `config.json`; on a resume compares with the run's effective config and either refuses
    (`ConfigError` naming every changed key) or appends to `config_history.jsonl`. Process 0
    writes; every process checks."""
    current = _without_resume_options(plain(config))
    allow_changes = bool(config.get("resume", {}).get("allow_changes", False))
    saved = effective_config(workdir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step}
    if saved is None:
        write_json(os.path.join(os.fspath(workdir), CONFIG_FILE), current, indent=2)
        return
    saved = _without_resume_options(saved)
    changed = differences(saved, current)
    refused = [c for c in changed if c in differences(saved, current, may_change)]
    if refused and not allow_changes:
        raise ConfigError(
            f"{workdir} holds a run started with other settings: {describe(refused)}; rerun "
            "with the original values, use a fresh --workdir, or pass "
            "--config.resume.allow_changes=True to continue with the change recorded"
        )
    entry["changed"] = {key: [old, new] for key, old, new in changed}
    entry["config"] = current
    if _process_index() == 0:
        with epath.Path(workdir, HISTORY_FILE).open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    if refused:
        print(
            f"[{label}] resuming {workdir} with changed settings (resume.allow_changes): "
            f"{describe(refused)}; recorded in {HISTORY_FILE}",
            file=sys.stderr,
            flush=True,
        )
