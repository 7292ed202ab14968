"""Expert Iteration in rounds (`configs/lm_rl.py:ei`, `echo_jax/lm/jobs/ei_rounds.py`): the
fine-tuning plan, the kept samples and their counts, and the job: its files, a round cut short
that resumes at the next chunk, more rounds added to a finished run, and config mistakes."""

import json
import subprocess

import numpy as np
import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.core.files import read_jsonl
from echo_jax.lm import grading, restore
from echo_jax.lm.jobs import ei_rounds
from echo_jax.lm.rl import rollout
from tests.conftest import REPO
from tests.lm.conftest import cpu_env, main_command

PROMPTS, SAMPLES, PER_CHUNK = 6, 2, 4  # two chunks, the second padded
EI = [
    f"data.num_prompts={PROMPTS}",
    "data.levels=(1,)",
    f"rl.samples_per_prompt={SAMPLES}",
    f"rl.prompts_per_step={PER_CHUNK}",
    "rl.max_new_tokens=8",
    "rl.train_batch_size=4",
    "rl.micro_batch_size=2",
    "ei.rounds=2",
    "eval.levels=(1,)",
    "eval.per_level=2",
    "eval.num_samples=2",
    "eval.max_new_tokens=8",
    "eval.batch_size=4",
    "train.checkpoint_every=2",
]


class Killed(Exception):
    """Stands for a kill in the middle of a round."""


def _config(untrained, *overrides):
    return load_config(f"{REPO}/configs/lm_rl.py:ei", [f"init_from={untrained}", *EI, *overrides])


def _every_text_correct(monkeypatch, style="tinygsm"):
    """An untrained model is never right: grade every completion correct, labelled `style`."""

    def graded(texts, refs, **kwargs):
        return [grading.Graded(style, "1", True, "ok") for _ in texts]

    monkeypatch.setattr(grading, "grade_batch", graded)


def test_the_plan_drops_each_epochs_last_partial_batch_and_reshuffles():
    plan = ei_rounds.SFTPlan([{}] * 10, batch_size=4, epochs=2, seed=3)
    assert (plan.per_epoch, plan.num_updates) == (2, 4)
    epochs = [plan.rows(0) + plan.rows(1), plan.rows(2) + plan.rows(3)]
    assert all(len(set(rows)) == 8 and set(rows) <= set(range(10)) for rows in epochs)
    assert epochs[0] != epochs[1] and plan.rows(2) == ei_rounds.SFTPlan([{}] * 10, 4, 2, 3).rows(2)
    assert ei_rounds.SFTPlan([{}] * 3, 4, 2, 0).num_updates == 0


def test_a_chunk_keeps_one_of_each_correct_question_completion_pair():
    info = rollout.RolloutInfo(
        questions=("q1", "q1", "q1", "q2"),
        texts=("a", "a", "b", "a"),
        styles=("tinygsm", "tinygsm", "omi2", "omi1"),
        rewards=np.ones(4, np.float32),
        correct=np.array([True, True, False, True]),
        lengths=np.ones(4, np.int32),
        stopped=np.ones(4, bool),
    )
    record = ei_rounds.chunk_record(0, info)
    assert [(k["question"], k["completion"], k["style"]) for k in record["kept"]] == [
        ("q1", "a", "tinygsm"),
        ("q2", "a", "omi1"),
    ]
    again = {**record, "chunk": 1}  # the same question in another chunk (a pool may repeat one)
    kept, stats = ei_rounds.round_stats([record, again])
    assert len(kept) == 2 and stats["sampled"] == 8 and stats["duplicates"] == 4
    kept, stats = ei_rounds.round_stats([record])
    assert stats["accuracy"] == 0.75 and stats["kept"] == len(kept) == 2
    assert stats["duplicates"] == 1
    assert stats["style_share/tinygsm"] == 0.5 and stats["style_accuracy/omi2"] == 0.0
    assert stats["kept_share/omi1"] == 0.5 and stats["kept_share/omi2"] == 0.0


def test_rounds_write_their_samples_rows_and_models(untrained, tmp_path, monkeypatch):
    _every_text_correct(monkeypatch)
    ei_rounds.run_ei(_config(untrained), str(tmp_path))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/greedy_pass@1" in rows[0] and "round" not in rows[0]
    for r, row in enumerate(rows[1:]):
        kept = read_jsonl(tmp_path / "rounds" / f"round_{r}.jsonl")
        assert row["sampled"] == PROMPTS * SAMPLES and row["accuracy"] == 1.0
        assert row["kept"] == len(kept) == PROMPTS * SAMPLES - row["duplicates"]
        assert {k["style"] for k in kept} == {"tinygsm"} and row["kept_share/tinygsm"] == 1.0
        assert row["sft/updates"] == 2 * (len(kept) // 4) and np.isfinite(row["sft/loss"])
        assert {k["round"] for k in kept} == {r} and "eval/pass@2" in row
        assert not (tmp_path / "rounds" / f"round_{r}.chunks.jsonl").exists()
    last = tmp_path / "rounds" / "round_1"
    assert restore.latest_step(str(last)) == rows[2]["sft/updates"]
    assert restore.vocab_name(str(last)) == restore.vocab_name(str(untrained))
    assert (tmp_path / "plots" / "style_share.png").stat().st_size


def test_a_cut_round_resumes_at_its_next_chunk_and_more_rounds_extend_the_run(
    untrained, tmp_path, monkeypatch
):
    _every_text_correct(monkeypatch)
    real, calls, armed = rollout.sample_and_grade, [], [True]

    def cut_after_one_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and armed and armed.pop():
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout, "sample_and_grade", cut_after_one_chunk)
    no_eval = "eval.per_level=0"  # every sample_and_grade call is then a chunk's
    with pytest.raises(Killed):
        ei_rounds.run_ei(_config(untrained, "ei.rounds=1", no_eval), str(tmp_path))
    chunks = read_jsonl(tmp_path / "rounds" / "round_0.chunks.jsonl")
    assert [c["chunk"] for c in chunks] == [0]
    calls.clear()
    ei_rounds.run_ei(_config(untrained, "ei.rounds=1", no_eval), str(tmp_path))
    assert len(calls) == 1  # only the second chunk was sampled again
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["sampled"] == PROMPTS * SAMPLES
    calls.clear()
    ei_rounds.run_ei(_config(untrained, "ei.rounds=2", no_eval), str(tmp_path))
    assert len(calls) == 2 and [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        0,
        1,
        2,
    ]
    history = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
    assert history[-1]["changed"] == {"ei.rounds": [1, 2]}


def test_a_round_whose_samples_fill_no_batch_keeps_its_model(untrained, tmp_path, monkeypatch):
    _every_text_correct(monkeypatch)
    config = _config(untrained, "ei.rounds=1", "rl.train_batch_size=32", "eval.per_level=0")
    ei_rounds.run_ei(config, str(tmp_path))
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["sft/updates"] == 0
    assert ei_rounds.model_source(config, str(tmp_path), 1) == str(untrained)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("ei.sft_from=best",), "ei.sft_from must be one of"),
        (("rl.micro_batch_size=3",), "must divide rl.train_batch_size"),
        (("init_from=",), "init_from is required"),
    ],
)
def test_config_mistakes_are_config_errors(untrained, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        ei_rounds.run_ei(_config(untrained, *overrides), str(tmp_path))


def test_rl_only_keys_are_refused_on_the_command_line(tmp_path):
    out = subprocess.run(
        main_command("configs/lm_rl.py:ei", tmp_path, "--config.rl.kl_coef=0.01"),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "kl_coef" in out.stderr.strip().splitlines()[-1]
