"""Resumable stages: skip if done, timing and header lines, the workdir guard, move aside."""

import json

import pytest

from echo_jax.core import stages, workdir
from echo_jax.core.config import ConfigError, load_config
from tests.conftest import REPO


def test_run_stage_runs_times_and_skips(tmp_path, capsys):
    calls = []

    def work():
        calls.append(1)
        return {"score": 0.5}

    run = stages.run_stage(work, label="job", index=2, total=3, name="train")
    assert (run.result, run.skipped) == ({"score": 0.5}, False) and run.seconds >= 0
    assert capsys.readouterr().err.splitlines() == [
        "[job] stage 2/3: train",
        "[job] stage 2/3: train: done in 0 s",
    ]
    skipped = stages.run_stage(work, label="job", index=2, total=3, name="train", done=True)
    assert (skipped.result, skipped.seconds, skipped.skipped) == (None, 0.0, True)
    assert capsys.readouterr().err == "[job] stage 2/3: train: finished earlier, skipped\n"

    path = tmp_path / "run" / "result.json"
    first = stages.run_stage(work, label="job", index=1, total=1, name="x", result_file=path)
    again = stages.run_stage(work, label="job", index=1, total=1, name="x", result_file=path)
    assert calls == [1, 1] and again.skipped and again.result == first.result
    assert json.loads(path.read_text()) == {"score": 0.5}


def test_reached_step_reads_the_checkpoints(tmp_path):
    assert not stages.reached_step(tmp_path / "absent", 4)
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    assert stages.latest_step(tmp_path) == 2 and not stages.reached_step(tmp_path, 4)
    (tmp_path / "checkpoints" / "4").mkdir()
    assert stages.reached_step(tmp_path, 4) and stages.reached_step(tmp_path / "checkpoints", 3)


def test_workdir_guard_names_the_key_with_both_values(tmp_path):
    stages.check_workdir(
        tmp_path, {"seed": 0, "train": {"lr": 0.1, "log_every": 10}}, may_change=("*.log_every",)
    )
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"seed": 0, "train": {"log_every": 10, "lr": 0.1}}
    stages.check_workdir(
        tmp_path, {"seed": 0, "train": {"lr": 0.1, "log_every": 5}}, may_change=("*.log_every",)
    )
    with pytest.raises(
        ConfigError,
        match=r"holds a run with other settings: seed \(0 -> 1\), train\.lr \(0\.1 -> "
        r"0\.2\); use a fresh --workdir",
    ):
        stages.check_workdir(tmp_path, {"seed": 1, "train": {"lr": 0.2, "log_every": 5}})
    with pytest.raises(ConfigError, match=r"settings: train\.extra \(None -> 1\)"):
        stages.check_workdir(
            tmp_path, {"seed": 0, "train": {"lr": 0.1, "log_every": 5, "extra": 1}}
        )


def test_workdir_guard_takes_a_config_as_record_run_writes_it(tmp_path):
    config = load_config(f"{REPO}/configs/echo_chamber.py:smoke")
    workdir.record_run(tmp_path / "a", config)
    with config.unlocked():
        del config["resume"]  # not part of the record
    stages.check_workdir(tmp_path / "b", config)
    assert (tmp_path / "a" / "config.json").read_text() == (
        tmp_path / "b" / "config.json"
    ).read_text()
    stages.check_workdir(tmp_path / "a", config, save=False)  # tuples compare as lists


def test_a_stage_of_other_settings_is_moved_aside(tmp_path, capsys):
    workdir = tmp_path / "eval"
    settings = {"step": 2}
    reuse = lambda current: stages.reuse_or_move_aside(  # noqa: E731
        workdir,
        current,
        filename="meta.json",
        done_file="done.json",
        label="eval",
        why="an eval of another step",
    )
    assert not reuse(settings)
    workdir.mkdir()
    (workdir / "meta.json").write_text(json.dumps(settings))
    assert not reuse(settings)  # started, not finished: resume it
    (workdir / "done.json").write_text("{}")
    assert reuse(settings)
    assert not reuse({"step": 4}) and not workdir.exists()
    assert json.loads((tmp_path / "eval.old1" / "meta.json").read_text()) == settings
    assert (
        f"[eval] {workdir} held an eval of another step; moved to {workdir}.old1"
        in capsys.readouterr().err
    )
    workdir.mkdir()
    assert stages.move_aside(workdir, label="eval", why="x") == f"{workdir}.old2"
