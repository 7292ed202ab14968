"""Real-data pretraining (`data.source="real"`): raw files in each dataset's own schema (a few rows
written here, not copied from the datasets) -> `download --from-files` -> the study's mixtures
(files repeated N times) through grain and seqio -> a pretraining job, with any vocabulary."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio

from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.lm import hf
from echo_jax.lm.data import download, pipeline, pretrain_files, tasks
from tests.conftest import REPO
from tests.lm.conftest import cpu_env, main_command

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "data" / "hf"


def _tinygsm(i: int) -> dict:
    q = f"Tom has {i + 3} apples and buys {i + 2} more. How many apples does he have?"
    code = (
        "def simple_math_problem() -> int:\n"
        f'    """{q}"""\n'
        f"    apples = {i + 3}\n    bought = {i + 2}\n"
        "    result = apples + bought\n    return result"
    )
    return {"question": q, "code": code}


def _omi1(i: int) -> dict:
    q = f"What is {i + 4} times 6?"
    solution = (
        f"Let's compute it.\n<llm-code>\n{i + 4} * 6\n</llm-code>\n"
        f"<llm-code-output>\n{(i + 4) * 6}\n</llm-code-output>\n"
        f"The answer is \\boxed{{{(i + 4) * 6}}}."
    )
    return {
        "question": q,
        "generated_solution": solution,
        "expected_answer": str((i + 4) * 6),
        "dataset": "gsm8k",
        "is_correct": i % 5 != 4,  # every fifth solution is wrong and must be left out
    }


def _omi2(i: int) -> dict:
    q = f"A train travels {10 * (i + 1)} km in 2 hours. What is its speed?"
    return {
        "problem": q,
        "generated_solution": f"Speed is distance over time: {10 * (i + 1)} / 2 = {5 * (i + 1)}."
        f" So the answer is \\boxed{{{5 * (i + 1)}}}.",
        "expected_answer": str(5 * (i + 1)),
        "problem_source": "augmented_gsm8k",
    }


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> pathlib.Path:
    """The three sets in their own schema and file formats, converted as a user would."""
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("pretrain")
    pq.write_table(pa.Table.from_pylist([_tinygsm(i) for i in range(30)]), raw / "tg.parquet")
    with open(raw / "omi1.jsonl", "w") as f:
        f.writelines(json.dumps(_omi1(i)) + "\n" for i in range(25))
    pq.write_table(pa.Table.from_pylist([_omi2(i) for i in range(20)]), raw / "omi2.parquet")
    for name, path in (("tinygsm", "tg.parquet"), ("omi1", "omi1.jsonl"), ("omi2", "omi2.parquet")):
        argv = ["--dataset", name, "--out", str(out), "--from-files", str(raw / path)]
        assert download.main(argv) == 0
    return out


def _lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_converted_files_hold_the_studys_example_format(real_dir):
    rows = {name: _lines(real_dir / f"{name}.jsonl") for name in ("tinygsm", "omi1", "omi2")}
    assert [len(r) for r in rows.values()] == [30, 20, 20]  # OMI1: its 20 correct solutions
    for name, solution in (("tinygsm", "code"), ("omi1", "generated_solution")):
        raw = _tinygsm(0) if name == "tinygsm" else _omi1(0)
        assert rows[name][0]["text"] == f"{raw['question']}\n\n{raw[solution]}"
        assert rows[name][0]["question"] == raw["question"]
    assert rows["omi2"][3]["style"] == "omi2" and rows["omi2"][3]["expected_answer"] == "20"


def test_mixtures_repeat_files_and_leave_validation_lines_out(real_dir):
    source = pretrain_files.MixtureSource("tg_4xomi1", real_dir, skip=5)
    assert len(source) == 25 + 4 * 15
    texts = [source[i]["text"] for i in range(len(source))]
    omi1 = _lines(real_dir / "omi1.jsonl")
    assert texts.count(omi1[5]["text"]) == 4  # repeated four times
    assert omi1[4]["text"] not in texts  # a validation line
    assert pretrain_files.repeats("tg_4xomi1") == {"tinygsm": 1, "omi1": 4}


def test_grain_pipeline_streams_the_real_mixture(real_dir):
    it = pipeline.make_train_iterator(
        mixture="tg_4xomi1",
        seed=0,
        seq_len=512,
        batch_size=2,
        levels=(1,),
        loss_on="all",
        vocab_name="byte",
        source="real",
        real_dir=str(real_dir),
        real_skip=5,
        read_threads=1,
        packing_bins=4,
    )
    batch = next(it)
    assert batch["inputs"].shape == (2, 512)
    text = bytes(int(t) - 3 for t in batch["inputs"][0] if t > 2).decode()
    assert "simple_math_problem" in text or "<llm-code>" in text
    assert batch["loss_mask"].sum() == (batch["segment_ids"] > 0).sum()  # loss on every token
    evals = pipeline.make_eval_batches(
        style="omi1",
        split="validation",
        seed=0,
        num_examples=5,
        seq_len=512,
        batch_size=2,
        levels=(1,),
        source="real",
        real_dir=str(real_dir),
    )
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in evals) == 5


def test_seqio_tasks_read_the_same_files(real_dir):
    names = tasks.register_real(str(real_dir), eval_examples=5)
    assert "echo_jax_real_mix_tg_4xomi1" in names and "echo_jax_real_tinygsm" in names
    mixture = seqio.get_mixture_or_task("echo_jax_real_mix_tg_4xomi1")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == {"echo_jax_real_tinygsm": 25, "echo_jax_real_omi1": 4 * 15}
    task = seqio.get_mixture_or_task("echo_jax_real_omi1")
    example = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert example["targets"][-1] == 1  # EOS appended
    assert task.num_input_examples("validation") == 5


def test_seqio_tasks_tokenize_with_a_hugging_face_tokenizer(real_dir, tmp_path):
    hf.import_hf(str(FIXTURES / "llama"), str(tmp_path / "imported"))
    folder = tmp_path / "imported" / "tokenizer"
    tasks.register_real(str(real_dir), eval_examples=5, vocab_name=f"hf:{folder}")
    task = seqio.get_mixture_or_task("echo_jax_real_omi1")
    example = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    vocabulary = task.output_features["targets"].vocabulary
    assert example["targets"][-1] == vocabulary.eos_id
    assert "<llm-code>" in vocabulary.decode(example["targets"].tolist())
    tasks.register_real(str(real_dir), eval_examples=5)  # leave the byte registrations


def test_missing_and_malformed_files_fail_in_one_line(real_dir, tmp_path):
    with pytest.raises(MissingFileError, match="echo_jax.lm.data.download --dataset omi2"):
        pretrain_files.style_file(tmp_path, "omi2")
    bad = tmp_path / "omi1.jsonl"
    bad.write_text(json.dumps({"text": "q\n\na"}) + "\n{not json\n")
    source = pretrain_files.JsonlSource(bad)
    assert source[0]["question"] == "q"
    with pytest.raises(ConfigError, match=r"omi1.jsonl:2: not valid JSON"):
        source[1]


def test_pretraining_job_on_real_files_with_a_hugging_face_tokenizer(real_dir, tmp_path):
    imported = tmp_path / "imported"
    hf.import_hf(str(FIXTURES / "llama"), str(imported))
    workdir = tmp_path / "pretrain"
    args = {
        "data.source": "real",
        "data.real_dir": real_dir,
        "data.mixture": "tg_omi1_omi2",
        "data.vocab": f"hf:{imported / 'tokenizer'}",
        "data.eval_examples": 4,
        "data.seq_len": 256,
        "model.max_len": 256,
        "train.num_steps": 2,
        "train.batch_size": 2,
        "train.warmup_steps": 1,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
        "mesh.data": 1,
    }
    command = main_command(
        "configs/lm_pretrain.py:tiny", workdir, *(f"--config.{k}={v}" for k, v in args.items())
    )
    done = subprocess.run(command, env=cpu_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert {"val/loss/tinygsm", "val/loss/omi1", "val/loss/omi2"} <= set(last)
    assert np.isfinite(last["val/loss/omi2"])
    args["data.real_dir"] = tmp_path / "nowhere"
    command = main_command(
        "configs/lm_pretrain.py:tiny",
        tmp_path / "second",
        *(f"--config.{k}={v}" for k, v in args.items()),
    )
    failed = subprocess.run(command, env=cpu_env(), cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "fetch it with: python -m echo_jax.lm.data.download" in failed.stderr.splitlines()[-1]
    assert not (tmp_path / "second" / "config.json").exists()
