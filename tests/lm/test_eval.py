"""Evaluation: the pass@k estimator, maj@k, the CLI job end to end on a tiny checkpoint, resume
after a cut-off run, and the one-line error for a missing data file. (The reader that drops a
cut-off last line of samples.jsonl is tested in tests/core/test_files.py.)"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from echo_jax.core.config import ConfigError, MissingFileError, load_config
from echo_jax.lm import eval as eval_lib
from echo_jax.lm import restore
from echo_jax.lm.jobs import eval as eval_job
from tests.conftest import REPO

PRETRAIN = [
    "--config.model.d_model=32",
    "--config.model.n_layers=2",
    "--config.model.n_heads=2",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=128",
    "--config.train.batch_size=4",
    "--config.data.eval_examples=4",
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=1",  # checkpoints of steps 1 and 2
    "--config.mesh.data=1",
]
EVAL = {
    "synthetic.levels": "(1, 2)",
    "synthetic.per_level": "2",
    "sampling.num_samples": "2",
    "sampling.max_new_tokens": "12",
    "chunk_prompts": "2",
}


def _main(*args, env=None):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "echo_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    run = _main("--config=configs/lm_pretrain.py:tiny", f"--workdir={workdir}", *PRETRAIN)
    assert run.returncode == 0, run.stderr[-2000:]
    return workdir


def test_pass_at_k_equals_enumeration_over_subsets():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        c, k = int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))
        subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are the correct ones
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert eval_lib.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert eval_lib.k_ladder(6) == [1, 2, 4, 6] and eval_lib.k_ladder(8) == [1, 2, 4, 8]


def test_majority_vote():
    assert eval_lib.majority_correct(["5", None, "3", "3"], [True, False, False, False]) is False
    assert eval_lib.majority_correct(["5", "3", "5 ", None], [True, False, True, False]) is True
    assert eval_lib.majority_correct(["4", "3"], [False, True]) is False  # tie: first seen wins
    assert eval_lib.majority_correct([None, None], [False, False]) is False


def _config(pretrained, *overrides):
    return load_config(
        f"{REPO}/configs/lm_eval.py:synthetic",
        [f"{k}={v}" for k, v in EVAL.items()]
        + [f"checkpoint={pretrained}", "batch_size=8", *overrides],
    )


def test_eval_end_to_end_then_resume_after_cut_off(pretrained, tmp_path):
    workdir = tmp_path / "eval"
    eval_job.run_eval(_config(pretrained), str(workdir))
    metrics = json.loads((workdir / "eval.json").read_text())
    assert set(eval_lib.METRIC_KEYS) <= set(metrics)
    assert metrics["step"] == 2 and metrics["num_prompts"] == 4 and metrics["num_samples"] == 2
    assert set(metrics["pass@k"]) == set(metrics["maj@k"]) == {"1", "2"}
    assert set(metrics["by_level"]) == {"1", "2"}
    assert sum(s["count"] for s in metrics["styles"]["sampled"].values()) == 8
    lines = (workdir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(x)["samples"]) == 2 for x in lines)

    # Cut off: the first chunk (2 prompts) was written, the third line only half.
    first = json.loads(lines[0])
    first["greedy"]["text"] = "KEPT"  # a redone prompt would lose this
    kept = [json.dumps(first), lines[1]]
    (workdir / "samples.jsonl").write_text("\n".join(kept) + "\n" + lines[2][:40])
    os.remove(workdir / "eval.json")
    metrics = eval_job.run_eval(_config(pretrained), str(workdir))
    records = [json.loads(x) for x in (workdir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [json.loads(x)["id"] for x in lines]
    assert records[0]["greedy"]["text"] == "KEPT"
    assert metrics["num_prompts"] == 4 and (workdir / "eval.json").exists()
    with pytest.raises(ConfigError, match="sampling"):  # another setup in the same workdir
        eval_job.run_eval(_config(pretrained, "sampling.temperature=1.0"), str(workdir))


def test_every_checkpoint_evaluated_with_curves_against_the_step(pretrained, tmp_path, capsys):
    workdir = tmp_path / "by_step"
    by_step = eval_job.run_eval(_config(pretrained, "all_checkpoints=True"), str(workdir))
    assert by_step["step"] == [1, 2] and len(by_step["greedy_pass@1"]) == 2
    assert {"pass@2", "maj@2", "share/tinygsm"} <= set(by_step)
    for step in (1, 2):
        assert json.loads((workdir / f"step_{step}" / "eval.json").read_text())["step"] == step
    assert json.loads((workdir / "steps.json").read_text()) == by_step
    assert (workdir / "plots" / "by_step.png").stat().st_size > 0
    capsys.readouterr()
    eval_job.run_eval(_config(pretrained, "all_checkpoints=True"), str(workdir))
    assert capsys.readouterr().err.count("finished earlier, skipped") == 2


def test_load_params_reads_the_workdir_or_its_checkpoints(pretrained):
    cfg, params = restore.load_params(str(pretrained))
    assert cfg.d_model == 32 and params["embedding"].shape == (cfg.vocab_size, 32)
    assert restore.latest_step(str(pretrained / "checkpoints")) == 2
    with pytest.raises(MissingFileError, match="no checkpoint"):
        restore.load_params(str(pretrained / "missing"))
    with pytest.raises(MissingFileError, match="no checkpoint"):
        restore.load_params(str(pretrained / "mistyped"), step=2)
    assert not (pretrained / "mistyped").exists()  # nothing created on a mistyped path


def test_checkpoint_without_its_config_names_the_missing_vocabulary(pretrained, tmp_path):
    assert restore.vocab_name(str(pretrained)) == "spm"
    assert restore.vocab_name(str(pretrained / "checkpoints")) == "spm"
    copied = tmp_path / "copied"
    copied.mkdir()
    os.symlink(pretrained / "checkpoints", copied / "checkpoints")  # config.json left behind
    with pytest.raises(MissingFileError, match="no config.json.*vocabulary is unknown"):
        restore.vocab_name(str(copied))
    (copied / "config.json").write_text(json.dumps({"kind": "lm_pretrain", "data": {}}))
    with pytest.raises(MissingFileError, match="has no data.vocab"):
        restore.vocab_name(str(copied))
    (copied / "config.json").write_text(json.dumps({"kind": "recsys_train", "data": {}}))
    with pytest.raises(ConfigError, match="holds a 'recsys_train' run, not a language model"):
        restore.model_config(str(copied))


def test_an_eval_of_an_older_step_is_moved_aside_so_the_stage_runs_again(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "lm_pretrain", "data": {"vocab": "spm"}}))
    config = load_config(f"{REPO}/configs/lm_eval.py:synthetic", [f"checkpoint={run}"])
    workdir = tmp_path / "eval"
    assert not eval_job.reuse_or_move_aside(config, str(workdir))
    workdir.mkdir()
    (workdir / "eval_meta.json").write_text(json.dumps(eval_job.eval_meta(config)))
    assert not eval_job.reuse_or_move_aside(config, str(workdir))  # started, unfinished: resume it
    (workdir / "eval.json").write_text("{}")
    assert eval_job.reuse_or_move_aside(config, str(workdir))
    (run / "checkpoints" / "4").mkdir()  # RL extended to more steps
    assert not eval_job.reuse_or_move_aside(config, str(workdir))
    assert not workdir.exists()
    assert json.loads((tmp_path / "eval.old1" / "eval_meta.json").read_text())["step"] == 2


def test_a_bad_data_file_line_is_one_line_error_naming_the_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    good = json.dumps({"question": "1+1?", "answer": "2 #### 2"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text(f"{good}\n\n{json.dumps({'question': 'q'})}\n")
    run = _main(
        "--config=configs/lm_eval.py:gsm8k",
        f"--workdir={tmp_path}/w",
        f"--config.checkpoint={tmp_path}",
        env={"ECHO_JAX_DATA": str(tmp_path)},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (error,) = [x for x in run.stderr.splitlines() if x.startswith("echo_jax: error")]
    assert error.endswith("gsm8k/test.jsonl:3: missing field(s) ['answer']")
    assert not (tmp_path / "w").exists()


def test_missing_data_file_is_one_line_error(tmp_path):
    run = _main(
        "--config=configs/lm_eval.py:gsm8k",
        f"--workdir={tmp_path}/w",
        f"--config.checkpoint={tmp_path}",
        env={"ECHO_JAX_DATA": str(tmp_path)},
    )
    assert run.returncode == 2
    errors = [x for x in run.stderr.splitlines() if x.startswith("echo_jax: error")]
    assert len(errors) == 1 and str(tmp_path / "gsm8k" / "test.jsonl") in errors[0]
    assert "ECHO_JAX_DATA" in errors[0]
    assert not (tmp_path / "w").exists()
