"""The experiment grid (`configs/echo_grid.py`, `echo_jax/lm/jobs/grid.py`): which cells a grid
and a shard hold, and the `smoke` grid end to end: a failing cell reported while the rest run,
shards that together cover the grid, a rerun that skips finished cells, the report rebuilt alone
(and by `notebooks/echo_grid.ipynb`)."""

import json
import subprocess
import zlib

import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.lm.jobs import grid as grid_job
from tests.conftest import REPO
from tests.lm.conftest import cpu_env, main_command
from tests.notebooks import execute_notebook


def _config(*overrides):
    return load_config(f"{REPO}/configs/echo_grid.py:smoke", list(overrides))


def test_cells_are_the_union_of_the_sweeps_grouped_by_pretraining_run():
    cells = grid_job.cells(_config())
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 6  # the scale and algorithm sweeps share one cell
    groups = [c.pretraining for c in cells]
    assert groups == sorted(groups, key=groups.index)  # each group's cells together
    assert {c.pretraining for c in cells} == {
        "tg_omi1_omi2-s1-s0",
        "tg_omi1_omi2-s2-s0",
        "tg_omi1-s1-s0",
    }


def test_a_cells_rl_block_has_its_algorithms_own_settings():
    config = _config("sweeps.mixture.algos=('reinforce', 'ei_online')")
    for cell in grid_job.cells(config):
        rl = grid_job.stage_configs(config, cell, "/grid")["rl"][1]
        own = load_config(f"{REPO}/configs/lm_rl.py:{cell.algo}")
        assert (rl.algo, rl.rl.kl_coef) == (cell.algo, cell.kl_coef)
        assert rl.rl.kl_estimator == own.rl.kl_estimator and rl.rl.top_p == own.rl.top_p
        assert rl.rl.prompts_per_step == 2  # the grid's own settings stay
    assert {c.algo for c in grid_job.cells(config)} >= {"reinforce", "ei_online", "ppo"}


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_are_disjoint_cover_the_grid_and_keep_groups_whole(count):
    cells = grid_job.cells(_config())
    shards = [grid_job.shard(cells, i, count) for i in range(count)]
    assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in cells)
    for a in range(count):
        for b in range(a + 1, count):
            assert not {c.pretraining for c in shards[a]} & {c.pretraining for c in shards[b]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("grid.shard=2", "grid.num_shards=2"), "grid.shard must be in"),
        (("sweeps.mixture.mixtures=('tg_9xomi1',)",), "unknown mixture 'tg_9xomi1'"),
        (("sweeps.mixture.sizes=('huge',)",), "unknown size 'huge'"),
        (("sweeps.mixture.algos=('dpo',)",), "unknown algo 'dpo'"),
        (("sizes.s2.n_heads=3",), "not divisible by n_heads 3"),  # before any stage runs
    ],
)
def test_grid_mistakes_are_config_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        grid_job.run_grid(_config(*overrides), str(tmp_path))
    assert not list(tmp_path.iterdir())


def _grid(workdir, *overrides):
    """The smoke grid through `main` (one CPU device, as on the command line)."""
    return subprocess.run(
        main_command("configs/echo_grid.py:smoke", workdir, *(f"--config.{o}" for o in overrides)),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )


def test_gain_figure_takes_the_mixture_sweeps_setting_when_groups_share_a_mixture(tmp_path):
    from echo_jax.lm import grid_report

    def group(mixture, algo, kl, gain):
        stats = {"mean": gain, "min": gain, "max": gain}
        share = {"tg": 1.0, "tg_omi1": 0.5, "tg_omi1_omi2": 1 / 3}[mixture]
        return {
            "mixture": mixture,
            "size": "tiny",
            "algo": algo,
            "kl_coef": kl,
            "tinygsm_in_mixture": share,
            "greedy_pass@1/gain": stats,
        }

    grouped = [
        group("tg_omi1_omi2", "grpo", 0.0, 0.1),
        group("tg_omi1_omi2", "ppo", 0.0, -0.2),  # same mixture, other gains: ties on x
        group("tg_omi1_omi2", "grpo", 0.01, 0.3),
        group("tg", "grpo", 0.0, 0.0),
        group("tg_omi1", "grpo", 0.0, 0.05),
    ]
    path = grid_report.plot_gain_vs_tinygsm(str(tmp_path), grouped)
    assert path and (tmp_path / "plots" / "gain_vs_tinygsm.png").stat().st_size
    assert grid_report.plot_gain_vs_tinygsm(str(tmp_path), grouped[:3]) is None  # one mixture


def test_smoke_grid_end_to_end(tmp_path, monkeypatch):
    cells = grid_job.cells(_config())
    broken = [c.name for c in cells if c.size == "s2"]  # its pretraining diverges (NaN)
    shard = zlib.crc32(b"tg_omi1_omi2-s2-s0") % 2
    diverging = "sizes.s2.lr=1e30"
    first = _grid(tmp_path, f"grid.shard={shard}", "grid.num_shards=2", diverging)
    assert first.returncode == 1, first.stderr[-2000:]
    assert first.stderr.splitlines()[-1].startswith("echo_jax: error: 1 of ")
    assert broken[0] in first.stderr.splitlines()[-1]
    done = {c.name for c in cells if grid_job.cell_finished(str(tmp_path), c)}
    assert done == {c.name for c in grid_job.shard(cells, shard, 2)} - set(broken)
    assert "loss is nan" in (tmp_path / "cells" / broken[0] / "error.txt").read_text()
    assert (
        f"{len(done)} of 6 cells finished; failed: {broken[0]}"
        in (tmp_path / "report.md").read_text()
    )

    second = _grid(tmp_path, f"grid.shard={1 - shard}", "grid.num_shards=2", diverging)
    assert second.returncode == 0, second.stderr[-2000:]
    fixed = _grid(tmp_path, "resume.allow_changes=True")  # retries the failed cell only
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "this shard 6, 5 finished earlier" in fixed.stderr
    assert all(grid_job.cell_finished(str(tmp_path), c) for c in cells)
    assert not (tmp_path / "cells" / broken[0] / "error.txt").exists()

    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["cells"]) == 6 and len(results["groups"]) == 6
    for record in results["cells"]:
        assert record["finished"] and record["steps"] == [1, 2]
        assert record["dominant"] in ("tinygsm", "omi1", "omi2")
        assert set(record["transfer"]) == {"level3"}  # the smoke grid's transfer evaluation
        assert {"1", "2"} <= set(record["greedy_during_rl"])  # RL's own evaluations, per step
    cell = cells[0]
    for folder in (f"transfer_before/{cell.pretraining}", f"cells/{cell.name}/transfer_after"):
        level3 = json.loads((tmp_path / folder / "level3" / "eval.json").read_text())
        assert list(level3["by_level"]) == ["3"]
    report = (tmp_path / "report.md").read_text()
    assert "6 of 6 cells finished." in report
    for section in (
        "## Every group",
        "by mixture and size",
        "## Algorithm x KL",
        "## Transfer: greedy pass@1 per level",
        "## Transfer to other problems",
    ):
        assert section in report
    for figure in ("style_share.png", "before_after.png", "gain_vs_tinygsm.png"):
        assert f"(plots/{figure})" in report and (tmp_path / "plots" / figure).stat().st_size

    (tmp_path / "report.md").unlink()
    again = _grid(tmp_path, "grid.report_only=True")
    assert again.returncode == 0 and "this shard 0, 0 finished earlier" in again.stderr
    assert "6 of 6 cells finished." in (tmp_path / "report.md").read_text()

    (tmp_path / "plots" / "style_share.png").unlink()
    execute_notebook("echo_grid.ipynb", tmp_path, monkeypatch)  # builds the report from the grid
    assert (tmp_path / "plots" / "style_share.png").stat().st_size
