"""Orbax checkpoints holding the train state, the data iterator and run metadata together.

A workdir identifies a run: `Checkpointer.restore_latest` resumes from its newest intact
checkpoint. Each checkpoint stores a `meta` item with the model's signature (its config and
parameter shapes); resuming with a different one refuses with a message instead of crashing
inside Orbax or silently starting over.

Damage is survivable: a checkpoint that cannot be read (a missing or truncated file) is moved
aside to `<step>.corrupt` and the next older one is used; a background save that failed stops
the run at the next step (`raise_if_save_failed`) naming the newest complete checkpoint. Orbax
writes a checkpoint into a temporary folder and renames it when complete, and deletes old ones
only after that, so the previous checkpoint is intact whatever happens to the new one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as preservation

from echo_jax.core.config import ConfigError
from echo_jax.core.workdir import differences


class IncompatibleCheckpointError(ConfigError):
    """The workdir holds a checkpoint of a different model than the config describes."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. a full disk); the run stopped."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (Orbax and TensorStore write dozens)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint folder (`<step>/`; Orbax writes into a temporary
    folder and renames it when done), ascending. Local paths and gs://."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _is_resource_error(error: BaseException) -> bool:
    """Out of host or device memory: the checkpoint may be fine, this process is not."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def tree_signature(tree: Any) -> dict[str, str]:
    """'path': 'dtype[shape]' for every leaf: what must match for a restore to make sense."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): f"{np.dtype(x.dtype).name}{list(x.shape)}" for p, x in leaves}


_META_NAMES = {"model": "model config", "signature": "state layout"}


class Checkpointer:
    """Async Orbax `CheckpointManager` with a keep-last-N policy over items state/data/meta."""

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        async_save: bool = True,
        keep_steps: Sequence[int] = (),
    ):
        """Keeps the newest `keep` checkpoints and, whatever their age, those of `keep_steps`."""
        self.directory = os.path.abspath(directory)
        policies = [preservation.LatestN(keep)]
        if keep_steps:
            policies.append(preservation.CustomSteps(sorted(keep_steps)))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation.AnyPreservationPolicy(policies),
                create=True,
                enable_async_checkpointing=async_save,
            ),
        )
        self._saving = False  # a save was started and not yet waited for

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def last_good(self) -> str:
        """'step N in DIR' for the newest complete checkpoint, or 'none written'."""
        steps = complete_steps(self.directory)
        return f"step {steps[-1]} in {self.directory}" if steps else "none written"

    def save(self, step: int, state: Any, data_iter: Any, meta: dict, force: bool = False) -> None:
        """Starts saving `step` (in the background when async); `CheckpointSaveError` when it
        cannot start, or when the previous background save failed."""
        self.raise_if_save_failed()
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._save_error(step, e) from None
        self._saving = True

    def raise_if_save_failed(self) -> None:
        """`CheckpointSaveError` if the background save has failed; does not wait for one that
        is still running (Orbax reports a failed commit only once its save has ended)."""
        if self._saving and not self.manager.is_saving_in_progress():
            self.wait()  # ended: returns at once, or raises its error

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"saving {what} in {self.directory} failed ({one_line(error)}); stopped. "
            f"Last good checkpoint: {self.last_good()}"
        )

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def check_compatible(self, step: int, meta: dict) -> None:
        """Refuses a resume whose `meta` differs from what `step` was saved with: the model
        config, the state layout, and what else the job puts there (the seed, RL's algorithm)."""
        saved = self.read_meta(step)
        changed = differences({key: saved.get(key) for key in meta}, meta)
        if changed:
            key, old, new = changed[0]
            item = key.split(".")[0]
            raise IncompatibleCheckpointError(
                f"{self.directory} step {step} was written with a different "
                f"{_META_NAMES.get(item, item)} ({key}: checkpoint has {old!r}, config gives "
                f"{new!r}); use a fresh --workdir or restore the original config"
            )

    def restore_latest(
        self, abstract_state: Any, data_iter: Any, meta: dict, label: str
    ) -> tuple[int, Any]:
        """(step, state) of the newest checkpoint that restores, the iterator restored in place;
        (0, None) without checkpoints.

        A checkpoint written with another `meta` refuses (`check_compatible`). One that cannot be
        read is moved aside to `<step>.corrupt` (said on stderr) once an older one restored; when
        none restores, nothing is moved and a `ConfigError` names the folder.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.check_compatible(step, meta)
                state = self.restore(step, abstract_state, data_iter)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever Orbax or TensorStore raise
                if _is_resource_error(e):
                    raise
                damaged.append((step, one_line(e)))
                continue
            for bad, why in damaged:
                self._move_aside(bad, why, label)
            return step, state
        if damaged:
            listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise ConfigError(
                f"no checkpoint in {self.directory} can be restored ({listed}); move the folder "
                "away to start afresh"
            )
        return 0, None

    def _move_aside(self, step: int, why: str, label: str) -> None:
        """On process 0 (every process saw the same damage and restores the same older step)."""
        source = epath.Path(self.directory) / str(step)
        target, n = source.parent / f"{step}.corrupt", 1
        while target.exists():
            n += 1
            target = source.parent / f"{step}.corrupt{n}"
        if jax.process_index() == 0:
            source.rename(target)
        self.manager.reload()
        print(
            f"[{label}] checkpoint step {step} in {self.directory} cannot be restored ({why}); "
            f"moved to {target.name}",
            file=sys.stderr,
            flush=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores the state (with the shardings of `abstract_state`) and the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        """Waits for the background save; `CheckpointSaveError` if it failed."""
        self._saving = False
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(None, e) from None

    def abandon(self) -> None:
        """Closes while another error is being reported: a failing save adds nothing to it."""
        with contextlib.suppress(Exception):
            self.manager.close()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
