"""Dry runs of launch/tpu.py: the printed gcloud commands, their quoting, argument errors."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "tpu.py"
_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

BASE = ["--name", "echo-1", "--zone", "us-central2-b"]


def dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> list[list[str]]:
    """Runs the CLI in-process with --dry-run and splits each printed line back into argv."""
    assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def flag(cmd: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in cmd if arg.startswith(f"{name}=")]
    return value


def test_create_passes_zone_accelerator_and_capacity(capsys):
    (cmd,) = dry_run(capsys, "create", *BASE, "--accelerator-type", "v4-8", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "echo-1"]
    assert flag(cmd, "--zone") == "us-central2-b"
    assert flag(cmd, "--accelerator-type") == "v4-8"
    assert flag(cmd, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in cmd and "--preemptible" not in cmd


def test_create_v5e_defaults_image_and_takes_project(capsys):
    (cmd,) = dry_run(
        capsys,
        "create",
        *BASE,
        "--accelerator-type",
        "v5litepod-32",
        "--project",
        "my-proj",
        "--preemptible",
    )
    assert flag(cmd, "--version") == "v2-alpha-tpuv5-lite"
    assert flag(cmd, "--project") == "my-proj"
    assert "--preemptible" in cmd


def test_setup_from_git_runs_on_all_workers(capsys):
    cmds = dry_run(
        capsys, "setup", *BASE, "--repo-url", "https://example.com/o/echo_jax.git", "--ref", "v1.0"
    )
    assert len(cmds) == 2
    for cmd in cmds:
        assert cmd[4] == "ssh" and flag(cmd, "--worker") == "all"
    clone = shlex.split(flag(cmds[0], "--command"))
    assert "https://example.com/o/echo_jax.git" in clone and "v1.0" in clone
    install = flag(cmds[1], "--command")
    assert "venv --python 3.11 echo_jax_venv" in install
    assert "pip install" in install and "./echo_jax[tpu]" in shlex.split(install)


def test_setup_from_local_dir_copies_with_scp(capsys):
    cmds = dry_run(capsys, "setup", *BASE, "--local-dir", "/src/echo_jax")
    assert [cmd[4] for cmd in cmds] == ["ssh", "scp", "ssh"]
    scp = cmds[1]
    assert "--recurse" in scp and "/src/echo_jax" in scp and "echo-1:echo_jax" in scp
    assert flag(scp, "--worker") == "all"


def test_run_quotes_config_workdir_and_overrides(capsys):
    tricky = '--config.run_name=it\'s a "test" $HOME'
    (cmd,) = dry_run(
        capsys,
        "run",
        *BASE,
        "--config",
        "configs/lm_pretrain.py:150m",
        "--workdir",
        "gs://bucket/run 1",
        "--",
        "--config.train.num_steps=1000",
        tricky,
    )
    assert cmd[4] == "ssh" and flag(cmd, "--worker") == "all"
    remote = shlex.split(flag(cmd, "--command"))
    assert remote[:3] == ["nohup", "bash", "-c"]
    assert remote[4:] == [">", "echo_jax.log", "2>&1", "<", "/dev/null", "&"]
    inner = remote[3]
    assert "export ECHO_JAX_DISTRIBUTED=1" in inner
    main = shlex.split(inner.rsplit("exec ", 1)[1])
    assert main == [
        "python",
        "-m",
        "echo_jax.main",
        "--config=configs/lm_pretrain.py:150m",
        "--workdir=gs://bucket/run 1",
        "--config.train.num_steps=1000",
        tricky,
    ]


def test_shards_run_one_grid_shard_per_vm(capsys):
    argv = ["--config", "configs/echo_grid.py:study_150m", "--workdir", "gs://b/grid"]
    cmds = dry_run(capsys, "run", *BASE, "--shards", "3", *argv, "--", "--config.seed=1")
    assert [cmd[5] for cmd in cmds] == ["echo-1-0", "echo-1-1", "echo-1-2"]
    for shard, cmd in enumerate(cmds):
        inner = shlex.split(flag(cmd, "--command"))[3]
        main = shlex.split(inner.rsplit("exec ", 1)[1])
        assert main[4:] == [
            "--workdir=gs://b/grid",
            "--config.seed=1",
            f"--config.grid.shard={shard}",
            "--config.grid.num_shards=3",
        ]
    deletes = dry_run(capsys, "delete", *BASE, "--shards", "2")
    assert [cmd[5] for cmd in deletes] == ["echo-1-0", "echo-1-1"]
    with pytest.raises(SystemExit):
        tpu.main(["run", *BASE, "--shards", "2", *argv, "--", "--config.grid.shard=1"])
    assert "--shards sets the grid's shard" in capsys.readouterr().err


def test_run_rejects_non_config_override(capsys):
    with pytest.raises(SystemExit) as e:
        tpu.main(["run", *BASE, "--config", "c.py", "--workdir", "gs://b", "--", "steps=3"])
    assert e.value.code == 2
    assert "--config.KEY=VALUE" in capsys.readouterr().err


def test_delete_and_status(capsys):
    (delete,) = dry_run(capsys, "delete", *BASE)
    assert delete[4:6] == ["delete", "echo-1"] and flag(delete, "--zone") == "us-central2-b"
    describe, tail = dry_run(capsys, "status", *BASE, "--tail", "20")
    assert describe[4:6] == ["describe", "echo-1"]
    assert flag(tail, "--worker") == "0" and flag(tail, "--command") == "tail -n 20 echo_jax.log"


def run_script(*argv: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=path if path is not None else os.environ["PATH"])
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, check=False
    )


def test_script_dry_run_prints_commands():
    result = run_script("delete", *BASE, "--dry-run")
    assert result.returncode == 0
    assert result.stdout == "gcloud compute tpus tpu-vm delete echo-1 --zone=us-central2-b\n"


def test_missing_required_argument_exits_with_argparse_message():
    result = run_script("create", "--name", "echo-1", "--zone", "z", "--dry-run")
    assert result.returncode == 2
    assert "the following arguments are required: --accelerator-type" in result.stderr


def test_missing_gcloud_fails_clearly(tmp_path):
    result = run_script("status", *BASE, path=str(tmp_path))
    assert result.returncode == 1
    assert "gcloud not found" in result.stderr
