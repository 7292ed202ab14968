"""A workdir belongs to one run: the lock (two real processes), the config record and history,
and workdirs that cannot be used."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from echo_jax.core import workdir
from echo_jax.core.config import ConfigError, resume_options
from echo_jax.core.files import read_jsonl
from tests.conftest import REPO

_HOLD = """
import sys, time
from echo_jax.core.workdir import lock_workdir
with lock_workdir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} on host \S+"):
            with workdir.lock_workdir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fresh = tmp_path / "new" / "run"
    with pytest.raises(ConfigError):  # a refused start removes the folders it created
        with workdir.lock_workdir(fresh):
            raise ConfigError("refused")
    assert not (tmp_path / "new").exists()
    with workdir.lock_workdir(tmp_path):  # the kernel dropped the dead holder's lock
        with workdir.lock_workdir(tmp_path):  # reentrant in one process
            pass
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_the_cli_refuses_a_busy_workdir_at_once_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        before = sorted(os.listdir(run))
        started = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "echo_jax.main",
                f"--config={REPO}/configs/lm_pretrain.py:tiny",
                f"--workdir={run}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("echo_jax: error: workdir") and f"pid {holder.pid}" in last
        assert "Traceback" not in result.stderr
        assert sorted(os.listdir(run)) == before == [".lock"]
        assert time.perf_counter() - started < 120
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _config(**train) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {"mixture": "a"},
            "train": {"lr": 0.1, "num_steps": 10, "log_every": 5, **train},
        }
    )
    config.resume = resume_options()
    return config


def test_config_json_is_the_start_and_every_resume_is_recorded(tmp_path):
    workdir.record_run(tmp_path, _config())
    started = (tmp_path / "config.json").read_text()
    assert json.loads(started)["train"]["lr"] == 0.1 and "resume" not in json.loads(started)
    assert not (tmp_path / workdir.HISTORY_FILE).exists()
    workdir.record_run(tmp_path, _config(), step=10)
    workdir.record_run(tmp_path, _config(num_steps=20, log_every=2), step=10)
    history = read_jsonl(tmp_path / workdir.HISTORY_FILE)
    assert [h["step"] for h in history] == [10, 10]
    assert history[0]["changed"] == {}
    assert history[1]["changed"] == {"train.log_every": [5, 2], "train.num_steps": [10, 20]}
    assert history[1]["config"]["train"]["num_steps"] == 20
    assert (tmp_path / "config.json").read_text() == started


def test_a_resume_that_changes_the_experiment_is_refused_naming_every_key(tmp_path):
    workdir.record_run(tmp_path, _config())
    changed = _config(lr=0.2)
    changed.data.mixture = "b"
    with pytest.raises(ConfigError) as error:
        workdir.record_run(tmp_path, changed, step=5)
    message = str(error.value)
    assert "data.mixture ('a' -> 'b'), train.lr (0.1 -> 0.2)" in message
    assert "--config.resume.allow_changes=True" in message and "\n" not in message
    assert not (tmp_path / workdir.HISTORY_FILE).exists()


def test_a_key_added_since_resumes_when_it_means_what_the_run_did(tmp_path):
    for run in ("a", "b"):
        workdir.record_run(tmp_path / run, _config())  # saved before `data.source` existed
    same = _config()
    same.data.source = "synthetic"
    workdir.record_run(tmp_path / "a", same, step=5)
    other = _config()
    other.data.source = "real"
    with pytest.raises(ConfigError, match=r"data.source \(None -> 'real'\)"):
        workdir.record_run(tmp_path / "b", other, step=5)


def test_allowed_changes_are_recorded_and_announced(tmp_path, capsys):
    workdir.record_run(tmp_path, _config())
    changed = _config(lr=0.2)
    changed.resume.allow_changes = True
    workdir.record_run(tmp_path, changed, step=5)
    assert "changed settings (resume.allow_changes): train.lr (0.1 -> 0.2)" in (
        capsys.readouterr().err
    )
    (entry,) = read_jsonl(tmp_path / workdir.HISTORY_FILE)
    assert entry["step"] == 5 and entry["changed"] == {"train.lr": [0.1, 0.2]}
    assert workdir.effective_config(tmp_path)["train"]["lr"] == 0.2
    workdir.record_run(tmp_path, _config(lr=0.2), step=8)  # the change is now the run's
    with pytest.raises(ConfigError, match=r"train\.lr \(0\.2 -> 0\.1\)"):
        workdir.record_run(tmp_path, _config(), step=8)


def test_workdirs_that_cannot_be_used_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        workdir.ensure_workdir(a_file)
    with pytest.raises(ConfigError, match="File name too long.*255 characters"):
        workdir.ensure_workdir(tmp_path / ("x" * 300))
    with pytest.raises(ConfigError, match="cannot use workdir /sys/echo_jax_test"):
        workdir.ensure_workdir("/sys/echo_jax_test")  # a place nobody may write
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="Permission denied"):
            with workdir.lock_workdir(read_only):
                pass


def test_a_start_that_trained_nothing_is_recorded_afresh(tmp_path):
    workdir.record_run(tmp_path, _config(lr=0.1))
    with pytest.raises(ConfigError):
        workdir.record_run(tmp_path, _config(lr=0.2), step=5)
    workdir.record_run(tmp_path, _config(lr=0.2), started=False)  # no checkpoint was written
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 0.2


def test_model_and_rl_settings_no_run_can_use_are_config_errors():
    from echo_jax.lm.model import ModelConfig
    from echo_jax.lm.rl import common

    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        ModelConfig(vocab_size=64, d_model=30, n_layers=1, n_heads=4, mlp_dim=8, max_len=8)
    with pytest.raises(ConfigError):
        common.RolloutConfig(prompts_per_step=3, samples_per_prompt=2, train_batch_size=4)
