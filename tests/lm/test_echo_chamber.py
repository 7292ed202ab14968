"""The echo chamber in miniature, measured (STUDIES.md A), and the one-command pipeline.

Science: from the pretrained model of `conftest.pretrained_capable` (greedy decoding picks the
natural-language style, which almost never scores; the two code styles usually do), a few RL
steps with fixed seeds route problems away from the style that never scores: one style takes
over and accuracy rises. Shares and accuracies are those of the run's own evaluations on 32
held-out level-1 problems, before the first step and after the last (greedy, and 4 samples at
temperature 0.7). The thresholds leave a margin below the numbers measured with these seeds
(benchmarks/RESULTS.md, "LM: RL post-training").
"""

import json
import os
import subprocess
import sys

import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.core.metrics import read_jsonl
from echo_jax.lm import grading
from echo_jax.lm.jobs import echo_chamber
from echo_jax.lm.jobs import rl as rl_job
from tests.conftest import REPO
from tests.notebooks import execute_notebook

EVAL = [
    "data.levels=(1,)",
    "eval.levels=(1,)",
    "eval.per_level=32",
    "eval.num_samples=4",
    "eval.every=0",
    "rl.max_new_tokens=128",
    "eval.max_new_tokens=128",
]
# Measured with these seeds after 6 steps (eval before -> after, session 8, benchmarks/RESULTS.md):
# GRPO, PPO, REINFORCE collapse onto tinygsm (greedy share 0 -> 1.00; sampled 0.28 -> 0.79,
# 0.68, 0.80; greedy pass@1 0.06 -> 0.84, 0.84, 0.78), EI onto omi1 (greedy 0.09 -> 1.00, sampled
# 0.36 -> 0.62, pass@1 0.06 -> 0.88); sampled accuracy 0.50 -> 0.71, 0.76, 0.74, 0.66.
# algo: minimum rise of the dominant style's greedy share, of its sampled share, of greedy
# pass@1 and of sampled accuracy (for PPO: the most it may fall).
THRESHOLDS = {
    "grpo": (0.5, 0.20, 0.3, 0.05),
    "ppo": (0.5, 0.10, 0.3, -0.10),
    "reinforce": (0.5, 0.20, 0.3, 0.05),
    "ei_online": (0.5, 0.15, 0.3, 0.05),
}
STEPS = 6


def run_algo(algo, pretrained, workdir, steps):
    """The RL job with the science tests' settings; returns (eval before, last row)."""
    config = load_config(
        f"{REPO}/configs/lm_rl.py:{algo}",
        [
            f"init_from={pretrained}",
            f"train.num_steps={steps}",
            f"train.checkpoint_every={steps}",
            *EVAL,
        ],
    )
    rl_job.run_rl(config, str(workdir))
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps + 1))
    clipped = max(r.get("clip_fraction", 0.0) for r in rows)
    return rows[0], {**rows[-1], "max_clip_fraction": clipped}


def collapse(before, after):
    """(dominant style at the end, rise of its greedy share, rise of its sampled share, rise of
    greedy pass@1, rise of sampled accuracy)."""
    top = max(grading.STYLE_LABELS, key=lambda s: after[f"eval/sampled_share/{s}"])
    rise = lambda key: after[key] - before[key]
    return (
        top,
        rise(f"eval/greedy_share/{top}"),
        rise(f"eval/sampled_share/{top}"),
        rise("eval/greedy_pass@1"),
        rise("eval/pass@1"),
    )


@pytest.mark.parametrize("algo", list(THRESHOLDS))
def test_rl_collapses_onto_one_style_and_raises_accuracy(algo, pretrained_capable, tmp_path):
    min_greedy, min_sampled, min_pass1, min_accuracy = THRESHOLDS[algo]
    before, after = run_algo(algo, pretrained_capable, tmp_path, STEPS)
    top, greedy_rise, sampled_rise, pass1_rise, accuracy_rise = collapse(before, after)
    summary = (
        f"{algo}: {top} greedy +{greedy_rise:.2f}, sampled +{sampled_rise:.2f}; "
        f"greedy pass@1 +{pass1_rise:.2f}, sampled accuracy +{accuracy_rise:.2f}; "
        f"max clip fraction {after['max_clip_fraction']:.4f}"
    )
    print(summary)
    assert top != "omi2", summary
    assert greedy_rise >= min_greedy and sampled_rise >= min_sampled, summary
    assert pass1_rise >= min_pass1 and accuracy_rise >= min_accuracy, summary
    assert {"kl", "entropy", "time/train_step"} <= set(after)
    assert ("value_loss" in after) == (algo == "ppo") and ("kept" in after) == (algo == "ei_online")
    if algo != "ei_online":  # 2 updates per rollout: the second one's ratio is off 1, and clips
        assert after["max_clip_fraction"] > 0, summary


def test_notebook_runs_the_pipeline_and_a_rerun_skips_every_stage(tmp_path, monkeypatch):
    workdir = tmp_path / "echo"
    execute_notebook("echo_chamber.ipynb", workdir, monkeypatch)
    report = (workdir / "report.md").read_text()
    assert "## Before and after RL" in report and "rl/plots/style_share.png" in report
    for name in (
        "rl/plots/style_share.png",
        "rl/plots/style_accuracy.png",
        "plots/before_after.png",
        "eval_before/eval.json",
        "eval_after/eval.json",
    ):
        assert (workdir / name).exists(), name

    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_jax.main",
            "--config=configs/echo_chamber.py:smoke",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("finished earlier, skipped") == 4, rerun.stderr[-3000:]

    # One more RL step: RL resumes, and the eval of the old last step is kept aside, not reused.
    extended = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_jax.main",
            "--config=configs/echo_chamber.py:smoke",
            f"--workdir={workdir}",
            "--config.rl.train.num_steps=3",
        ],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
    )
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert extended.stderr.count("finished earlier, skipped") == 2, extended.stderr[-3000:]
    step = lambda name: json.loads((workdir / name / "eval.json").read_text())["step"]
    assert (step("eval_after.old1"), step("eval_after")) == (2, 3)

    other_seed = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_jax.main",
            "--config=configs/echo_chamber.py:smoke",
            f"--workdir={workdir}",
            "--config.seed=1",
        ],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
    )
    assert other_seed.returncode != 0
    assert "other settings: seed (0 -> 1)" in other_seed.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "override,refused",
    [
        ("rl.rl.kl_coef=0.001", "rl.rl.kl_coef"),
        ("pretrain.model.d_model=64", "pretrain.model"),
        ("rl.train.num_steps=99", None),
        ("pretrain.train.log_every=7", None),
        ("rl.mesh.data=1", None),
    ],
)
def test_a_rerun_may_extend_rl_but_not_change_the_experiment(tmp_path, override, refused):
    echo_chamber.check_rerun(load_config(f"{REPO}/configs/echo_chamber.py:smoke"), str(tmp_path))
    (tmp_path / "pretrain" / "checkpoints" / "4").mkdir(parents=True)  # the run has started
    rerun = load_config(f"{REPO}/configs/echo_chamber.py:smoke", [override])
    if refused is None:
        echo_chamber.check_rerun(rerun, str(tmp_path))
    else:
        with pytest.raises(ConfigError, match=f"other settings: {refused}"):
            echo_chamber.check_rerun(rerun, str(tmp_path))
