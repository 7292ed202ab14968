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

# Config keys added after runs existed, with the value that means what those runs did: a run
# saved without the key resumes when the key holds that value (`fnmatch` patterns; ANY: whatever
# the value, as for an option of a part those runs did not use).
ANY = object()
ADDED_KEYS = {
    "*data.source": "synthetic",
    "*data.real_dir": "",
    "*model.item_projection": True,
    "*model.norm_eps": 1e-6,  # the language model's options of Hugging Face models
    "*model.n_kv_heads": 0,
    "*model.clip_qkv": 0.0,
    "*model.pooling": "sentence",
    "*train.negatives": 0,
    "*model.negatives": 0,  # the recommender's checkpoint metadata
    "phases.retrain": True,
    "loop.init": "new",
    "loop.train_histories": "swapped",
    "loop.click_epochs": 1,
    "*data.catalogue": "templated",  # the recommender's controlled catalogue before calibrated.py
    "*data.denoise": ANY,  # options of the calibrated catalogue
    "*data.praise": ANY,
    "*data.rewriter": "calibrated",
    "transfer": {},  # the grid's transfer evaluations (an empty block flattens to itself)
}


def _added_as_before(key: str, current: Any) -> bool:
    return any(
        fnmatch.fnmatchcase(key, pattern) and (value is ANY or current == value)
        for pattern, value in ADDED_KEYS.items()
    )


# --- the lock ------------------------------------------------------------------------------------

_held: dict[str, tuple[int, int]] = {}  # real path -> (fd, depth): this process's locks


def _is_local(path: str) -> bool:
    return "://" not in path


def _cannot_use(path: str, error: OSError) -> ConfigError:
    reason = error.strerror or type(error).__name__
    if error.errno == errno.ENAMETOOLONG:
        reason += " (at most 255 characters per path component)"
    return ConfigError(f"cannot use workdir {path}: {reason}")


def ensure_workdir(workdir: str | os.PathLike) -> str:
    """Creates `workdir` (and its parents); `ConfigError` in one line when it cannot be a
    workdir: an existing file, a place it cannot be created, a name too long. (Whether it is
    writable shows when the lock file is created.)"""
    path = os.fspath(workdir)
    if not _is_local(path):
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _cannot_use(path, e) from None
    return path


def _process_index() -> int:
    """jax's process index, 0 when jax is not loaded (a multi-host run initialises it first)."""
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `<workdir>/.lock` (see the module docstring) on process 0; creates the workdir, and
    removes the folders it created again when the run wrote nothing else (a refused start).
    Every other process, and a bucket path, go unlocked."""
    path = os.path.abspath(os.fspath(workdir)) if _is_local(os.fspath(workdir)) else workdir
    created = _first_missing(path) if _is_local(path) else None
    ensure_workdir(path)
    if not _is_local(path) or _process_index() != 0:
        yield
        return
    key = os.path.realpath(path)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        _held[key] = (_acquire(path), 1)
    try:
        yield
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            if created:
                _remove_if_unused(path, created)
            os.close(fd)  # releases the flock; the file stays (its content is the last holder)


def _remove_if_unused(path: str, created: str) -> None:
    """Removes `path` and its parents up to `created` while they hold nothing but the lock file
    (still locked while removed); a concurrent process's files stop it."""
    with contextlib.suppress(OSError):
        if os.listdir(path) != [LOCK_FILE]:
            return
        os.remove(os.path.join(path, LOCK_FILE))
        while True:
            os.rmdir(path)
            if path == created:
                return
            path = os.path.dirname(path)


def _acquire(workdir: str) -> int:
    lock_path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, not ours, or removed by a refused start meanwhile
        raise _cannot_use(workdir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"workdir {workdir} is in use by {holder} (lock: {lock_path}); "
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
    except the keys matched by a `may_change` pattern (`fnmatch`: `eval.*`, `*.log_every`) and
    keys added since the run was saved that hold the value meaning what it did (`ADDED_KEYS`); a
    key missing on one side has the value None."""
    old, new = _flatten(plain(saved)), _flatten(plain(current))
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not any(fnmatch.fnmatchcase(key, pattern) for pattern in may_change)
        and not (key not in old and _added_as_before(key, new.get(key)))
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


def check_run(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    may_change: Sequence[str] = RESUME_MAY_CHANGE,
    started: bool = True,
) -> tuple[dict | None, list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(the run's effective config or None for a fresh record, every change, the changes outside
    `may_change`); `ConfigError` naming every change outside `may_change` unless
    `resume.allow_changes`. A workdir whose run has not `started` (nothing trained or evaluated
    yet: it failed before its first checkpoint) is recorded afresh, so a corrected rerun is not
    held to the failed start's settings. Writes nothing."""
    saved = effective_config(workdir) if started else None
    if saved is None:
        return None, [], []
    current = _without_resume_options(plain(config))
    saved = _without_resume_options(saved)
    changed = differences(saved, current)
    refused = differences(saved, current, may_change)
    if refused and not config.get("resume", {}).get("allow_changes", False):
        raise ConfigError(
            f"{workdir} holds a run started with other settings: {describe(refused)}; rerun "
            "with the original values, use a fresh --workdir, or pass "
            "--config.resume.allow_changes=True to continue with the change recorded"
        )
    return saved, changed, refused


def record_run(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    step: int | None = None,
    may_change: Sequence[str] = RESUME_MAY_CHANGE,
    label: str = "run",
    started: bool = True,
) -> None:
    """Records a start of `config` in `workdir` (module docstring) after `check_run`: a fresh
    record writes `config.json` (and drops an earlier history); a resume appends its config,
    `step` and changes to `config_history.jsonl`. Process 0 writes; every process checks."""
    saved, changed, refused = check_run(workdir, config, may_change=may_change, started=started)
    current = _without_resume_options(plain(config))
    if saved is None:
        if _process_index() == 0:
            epath.Path(workdir, HISTORY_FILE).unlink(missing_ok=True)
        write_json(os.path.join(os.fspath(workdir), CONFIG_FILE), current, indent=2)
        return
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "changed": {key: [old, new] for key, old, new in changed},
        "config": current,
    }
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
