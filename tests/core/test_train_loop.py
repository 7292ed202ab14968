"""The shared loop: resume, NaN guard, incompatible resume, preemption, metrics files."""

import os
import signal

import pytest

from echo_jax.core import sharding
from echo_jax.core.checkpoint import IncompatibleCheckpointError
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
