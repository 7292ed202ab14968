"""The source-bias mechanism, measured: `source_bias.py:mechanism_smoke` (the calibrated
catalogue, the study's settings, frozen MiniLM, seeds 0-2) trains phase 1 with the rewrite's
denoising d at 0 and 1 and the identity control, then the job's tables are checked."""

import json
import pathlib

import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.recsys.jobs.mechanism import run_mechanism

REPO = pathlib.Path(__file__).resolve().parents[2]
# measured (seeds 0-2): mean tower {D0_MEAN} at d = 0 against {D1_MEAN} at d = 1; SASRec ...
MIN_GAIN = 0.2


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


def test_denoising_moves_the_preference_to_the_rewrite(measured):
    summary, _ = measured
    cells = summary["mechanism"]
    print({c: {e: round(iv["mean"], 3) for e, iv in row.items()} for c, row in cells.items()})
    for encoder in cells["0_0"]:
        kept, removed = cells["0_0"][encoder], cells["1_0"][encoder]
        assert removed["mean"] > kept["mean"] + MIN_GAIN, encoder
        assert removed["lo"] > kept["hi"], encoder  # the 95 % intervals do not overlap


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
