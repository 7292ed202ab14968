"""The source-bias mechanism, measured: `source_bias.py:mechanism_smoke` (the calibrated
catalogue, the study's settings, frozen MiniLM, seeds 0-2) trains phase 1 with the rewrite's
denoising d at 0 and 1 and the identity control, then the job's tables are checked."""

import json
import pathlib

import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.recsys.jobs.mechanism import run_mechanism

REPO = pathlib.Path(__file__).resolve().parents[2]
# measured (seeds 0-2): the parameter-free mean tower 0.229 [0.166, 0.292] at d = 0 against
# 0.599 [0.475, 0.724] at d = 1, higher by 0.35-0.41 in each seed. SASRec is not asserted on:
# here (4 steps) it moves 0.381 -> 0.462, but at the `mechanism` size (24 steps) the trained
# encoders barely follow d (RESULTS.md), so a threshold would test under-training.
MEAN_TOWER_GAIN = 0.2


def _config(*overrides):
    return load_config(
        f"{REPO}/configs/source_bias.py:mechanism_smoke",
        ["train.async_checkpoints=False", *overrides],
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory, minilm_dir):
    workdir = tmp_path_factory.mktemp("mechanism")
    return run_mechanism(_config(), str(workdir)), workdir


def test_identical_copies_tie_exactly(measured):
    summary, _ = measured
    for encoder, iv in summary["mechanism"]["identity"].items():
        assert iv == {"mean": 0.5, "lo": 0.5, "hi": 0.5}, encoder


def _per_seed(workdir, cell, encoder):
    return [
        json.loads((workdir / "runs" / f"{cell}-{encoder}-seed{s}" / "result.json").read_text())[
            "bias/llm_ratio_ties_half"
        ]
        for s in (0, 1, 2)
    ]


def test_denoising_moves_the_preference_to_the_rewrite(measured):
    summary, workdir = measured
    cells = summary["mechanism"]
    print({c: {e: round(iv["mean"], 3) for e, iv in row.items()} for c, row in cells.items()})
    kept, removed = cells["0_0"]["mean"], cells["1_0"]["mean"]
    assert removed["mean"] > kept["mean"] + MEAN_TOWER_GAIN
    assert removed["lo"] > kept["hi"]  # the 95 % intervals do not overlap
    assert kept["hi"] < 0.5 < removed["mean"]  # the noise decides which copy wins
    # paired by seed (the same catalogue and training seed)
    pairs = zip(_per_seed(workdir, "0_0", "mean"), _per_seed(workdir, "1_0", "mean"))
    assert all(d1 > d0 + MEAN_TOWER_GAIN for d0, d1 in pairs)


def test_cells_that_change_only_the_aigc_text_share_one_model(measured):
    _, workdir = measured
    for encoder in ("mean", "sasrec"):
        for seed in (0, 1, 2):
            runs = [
                workdir / "runs" / f"{c}-{encoder}-seed{seed}" for c in ("0_0", "1_0", "identity")
            ]
            assert (runs[0] / "checkpoints").is_dir()
            assert not any((r / "checkpoints").exists() for r in runs[1:])
            human_side = {json.loads((r / "result.json").read_text())["eval/ndcg@5"] for r in runs}
            assert len(human_side) == 1, (encoder, seed, human_side)  # the same model


def test_report_results_and_a_rerun_that_trains_nothing(measured, capsys):
    summary, workdir = measured
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["mechanism"] == summary["mechanism"]
    assert set(saved["mechanism"]["1_0"]) == {"mean", "sasrec"}
    report = (workdir / "report.md").read_text()
    assert "| 1_0 |" in report and "| identity |" in report
    assert (workdir / "plots" / "mechanism.png").stat().st_size
    capsys.readouterr()
    assert run_mechanism(_config(), str(workdir)) == summary
    assert capsys.readouterr().err.count("finished earlier, skipped") == 18


def test_bad_mechanism_settings_are_one_error(tmp_path):
    with pytest.raises(ConfigError, match="mechanism.controls"):
        run_mechanism(_config("mechanism.controls=('oracle',)"), str(tmp_path))
    with pytest.raises(ConfigError, match="data.catalogue=calibrated"):
        run_mechanism(_config("data.catalogue=templated"), str(tmp_path))
    assert not any(tmp_path.iterdir())  # validated before writing anything
