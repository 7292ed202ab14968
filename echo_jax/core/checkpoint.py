"""Orbax checkpoints holding the train state, the data iterator and run metadata together.

A workdir identifies a run: `Checkpointer.restore_or_none` resumes from its latest checkpoint by
default. Each checkpoint stores a `meta` item with the model's signature (its config and
parameter shapes); resuming with a different one refuses with a message instead of crashing
inside Orbax or silently starting over.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(RuntimeError):
    """The workdir holds a checkpoint of a different model than the config describes."""


def tree_signature(tree: Any) -> dict[str, str]:
    """'path': 'dtype[shape]' for every leaf: what must match for a restore to make sense."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): f"{np.dtype(x.dtype).name}{list(x.shape)}" for p, x in leaves}


_META_NAMES = {"model": "model config", "signature": "state layout"}


def _first_difference(saved: dict, current: dict) -> str:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key}: checkpoint has {saved.get(key)!r}, config gives {current.get(key)!r}"
    return ""


class Checkpointer:
    """Async Orbax `CheckpointManager` with a keep-last-N policy over items state/data/meta."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, meta: dict, force: bool = False) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def check_compatible(self, step: int, meta: dict) -> None:
        """Refuses a resume whose `meta` differs from what `step` was saved with: the model
        config, the state layout, and what else the job puts there (the seed, RL's algorithm)."""
        saved = self.read_meta(step)
        for key in sorted(meta):
            old, new = saved.get(key), meta[key]
            if old != new:
                detail = (
                    _first_difference(old or {}, new)
                    if isinstance(new, dict) and isinstance(old, (dict, type(None)))
                    else f"checkpoint has {old!r}, config gives {new!r}"
                )
                raise IncompatibleCheckpointError(
                    f"{self.directory} step {step} was written with a different "
                    f"{_META_NAMES.get(key, key)} ({detail}); use a fresh --workdir or restore "
                    "the original config"
                )

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores the state (with the shardings of `abstract_state`) and the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
