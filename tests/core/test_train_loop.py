"""The shared loop: resume, NaN guard, incompatible resume, preemption, metrics files."""

import concurrent.futures
import errno
import os
import pathlib
import signal

import ml_collections
import orbax.checkpoint as ocp
import pytest

from echo_jax.core import sharding
from echo_jax.core.checkpoint import CheckpointSaveError, IncompatibleCheckpointError
from echo_jax.core.config import ConfigError
from echo_jax.core.metrics import read_jsonl
from echo_jax.core.train_loop import LoopConfig, NonFiniteLossError, Preempted, train
from tests.core.toy import toy_iterator, toy_task

RULES = (("embed", None),)


def _loop(**kw):
    base = dict(num_steps=20, log_every=1, checkpoint_every=5, async_checkpoints=False)
    return LoopConfig(**{**base, **kw})


def _mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def test_loss_falls_and_files_are_written(tmp_path):
    train(toy_task(), _loop(), _mesh(), RULES, str(tmp_path), seed=0)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["train/loss"] < 0.1 * rows[0]["train/loss"]
    assert os.listdir(tmp_path / "tensorboard")
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "20"


def test_resume_continues_exactly(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(toy_task(), _loop(), _mesh(), RULES, str(full), seed=0)
    train(toy_task(), _loop(num_steps=10), _mesh(), RULES, str(cut), seed=0)
    train(toy_task(), _loop(), _mesh(), RULES, str(cut), seed=0)  # resumes at 10
    losses = lambda d: [r["train/loss"] for r in read_jsonl(d / "metrics.jsonl")]
    assert losses(cut) == losses(full)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 13.*step 10"):
        train(toy_task(nan_at_step=13), _loop(log_every=4), _mesh(), RULES, str(tmp_path), 0)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [5, 10]


def test_incompatible_resume_is_refused_and_changes_nothing(tmp_path):
    train(toy_task(dim=8), _loop(num_steps=5), _mesh(), RULES, str(tmp_path), seed=0)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(IncompatibleCheckpointError, match="different model config"):
        train(toy_task(dim=4), _loop(num_steps=10), _mesh(), RULES, str(tmp_path), seed=0)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_resume_with_another_seed_is_refused(tmp_path):
    train(toy_task(), _loop(num_steps=5), _mesh(), RULES, str(tmp_path), seed=0)
    with pytest.raises(IncompatibleCheckpointError, match="different seed.*has 0, config gives 1"):
        train(toy_task(), _loop(num_steps=10), _mesh(), RULES, str(tmp_path), seed=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    calls = []

    def sigterm_at_seventh_batch(batch):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    task = toy_task()
    task.train_iter = toy_iterator(on_batch=sigterm_at_seventh_batch)
    with pytest.raises(Preempted, match="SIGTERM at step 7"):
        train(task, _loop(num_steps=100, checkpoint_every=50), _mesh(), RULES, str(tmp_path), 0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["7"]


def _newest_state_file(checkpoint) -> pathlib.Path:
    files = [p for p in (checkpoint / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(toy_task(), _loop(num_steps=25), _mesh(), RULES, str(full), seed=0)
    train(toy_task(), _loop(), _mesh(), RULES, str(cut), seed=0)  # checkpoints 10, 15, 20
    damaged = _newest_state_file(cut / "checkpoints" / "20")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    train(toy_task(), _loop(num_steps=25), _mesh(), RULES, str(cut), seed=0)
    err = capsys.readouterr().err
    assert "checkpoint step 20 in" in err and "cannot be restored" in err
    assert "moved to 20.corrupt" in err and "resumed from" in err and "at step 15" in err
    assert sorted(os.listdir(cut / "checkpoints")) == ["15", "20", "20.corrupt", "25"]
    rows = read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 26))  # no duplicate rows for 16-20
    assert [r["train/loss"] for r in rows] == [
        r["train/loss"] for r in read_jsonl(full / "metrics.jsonl")
    ]


def test_without_an_intact_checkpoint_the_resume_is_refused_and_nothing_moves(tmp_path):
    train(toy_task(), _loop(num_steps=5), _mesh(), RULES, str(tmp_path), seed=0)
    damaged = _newest_state_file(tmp_path / "checkpoints" / "5")
    damaged.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no checkpoint in \S+ can be restored \(step 5: "):
        train(toy_task(), _loop(num_steps=10), _mesh(), RULES, str(tmp_path), seed=0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_a_failed_background_save_stops_the_run_before_the_next_save(tmp_path, monkeypatch):
    original = ocp.StandardCheckpointHandler.async_save
    calls = []

    async def disk_full_on_second_save(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        calls.append(directory)
        if len(calls) == 2:
            failed = concurrent.futures.Future()
            failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
            futures = [*futures, failed]
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full_on_second_save)
    loop = _loop(async_checkpoints=True, log_every=1)
    with pytest.raises(CheckpointSaveError) as error:
        train(toy_task(), loop, _mesh(), RULES, str(tmp_path), seed=0)
    message = str(error.value)
    assert "No space left on device" in message and "Last good checkpoint: step 5 in" in message
    assert "\n" not in message
    stopped = max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl"))
    assert 10 <= stopped <= 15  # at the step after the save failed (or at the latest the next save)
    assert [p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()] == ["5"]
    monkeypatch.undo()
    train(toy_task(), _loop(), _mesh(), RULES, str(tmp_path), seed=0)  # resumes from step 5
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 21))


def test_a_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint: none written"):
        train(toy_task(nan_at_step=2), _loop(log_every=1), _mesh(), RULES, str(tmp_path), 0)


def test_a_resume_with_another_learning_rate_is_refused_before_anything_is_written(tmp_path):
    config = lambda lr: ml_collections.ConfigDict({"train": {"lr": lr}, "seed": 0})
    train(toy_task(), _loop(num_steps=5), _mesh(), RULES, str(tmp_path), 0, config=config(0.1))
    before = {p: (tmp_path / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match=r"train\.lr \(0\.1 -> 0\.2\)"):
        train(toy_task(), _loop(num_steps=10), _mesh(), RULES, str(tmp_path), 0, config=config(0.2))
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_log_spaced_checkpoints_are_saved_and_kept(tmp_path):
    loop = _loop(num_steps=20, checkpoint_every=10, keep_checkpoints=1, log_checkpoints=5)
    assert loop.kept_steps() == (1, 2, 4, 9, 20)  # round(20 ** (i / 4))
    train(toy_task(), loop, _mesh(), RULES, str(tmp_path), seed=0)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [1, 2, 4, 9, 20]
