"""The RL job (`configs/lm_rl.py`): its metrics and figures, the resumable prompt stream, a run
killed with SIGKILL that resumes exactly where its last checkpoint left it, GSM8K prompts and
config mistakes."""

import os
import signal
import subprocess
import time

import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.core.metrics import read_jsonl
from echo_jax.lm import grading
from echo_jax.lm.data import generators, vocab
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import ModelConfig
from tests.conftest import REPO
from tests.lm.conftest import cpu_env as _env
from tests.lm.conftest import main_command as _main

STEPS = 12
RL = [
    "--config.rl.prompts_per_step=2",
    "--config.rl.samples_per_prompt=4",
    "--config.rl.max_new_tokens=8",
    "--config.rl.train_batch_size=4",
    "--config.rl.micro_batch_size=2",
    "--config.rl.sampler_batch_size=4",
    "--config.eval.levels=(1, 2)",
    "--config.eval.per_level=2",
    "--config.eval.num_samples=2",
    "--config.eval.max_new_tokens=8",
    "--config.eval.batch_size=4",
    "--config.eval.every=4",
    f"--config.train.num_steps={STEPS}",
    "--config.train.checkpoint_every=2",
]
STEP_KEYS = {
    "reward_mean",
    "accuracy",
    "kl",
    "entropy",
    "response_length",
    "clip_fraction",
    "time/rollout",
    "time/reward",
    "time/train_step",
    *(f"style_share/{s}" for s in grading.STYLE_LABELS),
}


def _rl(workdir, untrained, algo="grpo"):
    return _main(f"configs/lm_rl.py:{algo}", workdir, f"--config.init_from={untrained}", *RL)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_sigkill_then_rerun_continues_exactly(tmp_path, untrained):
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = subprocess.run(_rl(full, untrained), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_jsonl(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert all(STEP_KEYS <= set(r) for r in rows[1:])
    evals = [r["step"] for r in rows if "eval/L2/greedy_pass@1" in r]
    assert evals == [0, 4, 8, 12] and "eval/L1/pass@2" in rows[-1]
    assert sorted(os.listdir(full / "plots")) == ["style_accuracy.png", "style_share.png"]

    proc = subprocess.Popen(
        _rl(killed, untrained),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "2").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit()) < STEPS

    rerun = subprocess.run(
        _rl(killed, untrained), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[rl] resumed from" in rerun.stderr
    assert _comparable(read_jsonl(killed / "metrics.jsonl")) == _comparable(rows)

    again = subprocess.run(
        _rl(killed, untrained), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert again.returncode == 0 and "already finished" in again.stderr


def test_resume_with_another_algorithm_or_seed_is_refused(tmp_path, untrained):
    workdir = tmp_path / "rl"
    args = [a for a in RL if not a.startswith("--config.train.num_steps")]
    run = lambda algo, steps, *extra: subprocess.run(
        _main(
            f"configs/lm_rl.py:{algo}",
            workdir,
            f"--config.init_from={untrained}",
            *args,
            f"--config.train.num_steps={steps}",
            *extra,
        ),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert run("grpo", 2).returncode == 0
    allow = "--config.resume.allow_changes=True"
    for algo, extra, message in (
        ("ei_online", (), "other settings: algo ('grpo' -> 'ei_online')"),  # the config record
        ("grpo", ("--config.seed=1",), "other settings: seed (0 -> 1)"),
        ("grpo", ("--config.seed=1", allow), "different seed"),  # allowed: the checkpoint's meta
    ):
        refused = run(algo, 4, *extra)
        assert refused.returncode != 0
        assert message in refused.stderr.splitlines()[-1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_prompt_stream_passes_over_every_prompt_and_resumes():
    source = generators.ProblemSource("rl", seed=3, levels=(1,), size=5)
    stream = rl_job.prompt_stream(source, 3, 2)
    first = [next(stream) for _ in range(2)]
    state = stream.get_state()
    rest = [next(stream) for _ in range(3)]
    questions = [p["question"] for batch in first + rest for p in batch]
    every = sorted(source[i]["question"] for i in range(5))
    assert sorted(questions[:5]) == sorted(questions[5:]) == every  # two whole passes
    assert questions[:5] != questions[5:]  # each in its own seeded order
    resumed = rl_job.prompt_stream(source, 3, 2)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(3)] == rest


def test_gsm8k_prompts_fit_the_prompt_budget(shared_data):
    if not (shared_data / "gsm8k" / "train.jsonl").exists():
        pytest.skip("GSM8K is not in $ECHO_JAX_DATA")
    config = load_config(
        f"{REPO}/configs/lm_rl.py:grpo", ["data.prompts=gsm8k", "rl.max_prompt_len=128"]
    )
    vocabulary = vocab.get_vocabulary("spm")
    prompts = rl_job.load_prompts(config, vocabulary)
    assert 1000 < len(prompts) <= 7473
    assert max(len(vocabulary.encode(p["question"] + "\n\n")) for p in prompts) <= 128
    assert rl_job.prompt_dataset(config) == "gsm8k"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "config.init_from is required"),
        (["init_from=x", "data.prompts=math"], "data.prompts must be"),
    ],
)
def test_config_mistakes_are_config_errors(tmp_path, overrides, message):
    config = load_config(f"{REPO}/configs/lm_rl.py:grpo", overrides)
    with pytest.raises(ConfigError, match=message):
        rl_job.run_rl(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_expert_iteration_refuses_a_kl_coefficient():
    config = load_config(f"{REPO}/configs/lm_rl.py:ei_online", ["rl.kl_coef=0.01"])
    with pytest.raises(ConfigError, match="no KL term"):
        rl_job.build_algorithm(config, ModelConfig(**config.model.to_dict()), None)
