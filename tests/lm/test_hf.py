"""Hugging Face import/export (`echo_jax.lm.hf`) against tiny `transformers` models built by
tests/data/make_hf_fixtures.py: float32 logits, greedy continuations, a bitwise round trip, the
tokenizer, and the errors. No torch needed except in the one test that loads an export back."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.lm import hf, restore
from echo_jax.lm.data import vocab
from echo_jax.lm.model import Transformer
from echo_jax.lm.sampler import Sampler, SamplingParams, pad_prompts
from tests.conftest import REPO
from tests.lm.conftest import cpu_env, main_command

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "data" / "hf"
ARCHS = ("olmo", "llama")
# float32 on both sides; measured max abs logit difference 6e-6 (OLMo), 1e-5 (Llama), with logits
# of std ~1.7; the wrong norm eps moves them by ~1e-3, no clamp by 7, the wrong rope theta by 3
LOGIT_ATOL = 1e-4


def _imported(tmp_path: pathlib.Path, arch: str) -> str:
    workdir = str(tmp_path / f"{arch}_imported")
    hf.import_hf(str(FIXTURES / arch), workdir)
    return workdir


def _logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, np.ones_like(tokens))
    return np.asarray(logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_model_gives_transformers_logits_and_greedy_continuation(tmp_path, arch):
    reference = np.load(FIXTURES / arch / "reference.npz")
    workdir = _imported(tmp_path, arch)
    cfg, params = restore.load_params(workdir)
    assert (cfg.norm, cfg.n_kv_heads > 0) == (
        ("layernorm", False) if arch == "olmo" else ("rms", True)
    )
    logits = _logits(cfg, params, reference["tokens"])
    assert np.abs(logits - reference["logits"]).max() < LOGIT_ATOL

    prompts = reference["prompts"].tolist()
    sampler = Sampler(cfg, eos_id=-1)  # transformers' generate ran without an EOS stop
    padded, lengths = pad_prompts(prompts)
    out = sampler(params, padded, lengths, jax.random.key(0), SamplingParams(max_new_tokens=10))
    continuation = reference["greedy"][:, len(prompts[0]) :]
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), continuation)


def test_round_trip_is_bitwise_and_the_tokenizer_reads_text(tmp_path):
    for arch in ARCHS:
        first = _imported(tmp_path, arch)
        exported = tmp_path / f"{arch}_hf"
        hf.export_hf(first, str(exported))
        second = str(tmp_path / f"{arch}_again")
        hf.import_hf(str(exported), second)
        (cfg1, p1), (cfg2, p2) = restore.load_params(first), restore.load_params(second)
        assert cfg1 == cfg2
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert json.loads((exported / "config.json").read_text())["architectures"] == [
            hf.OLMO if arch == "olmo" else hf.LLAMA
        ]
    tokenizer = vocab.get_vocabulary(restore.vocab_name(first))
    text = "def simple_math_problem() -> int:\n    return 48 + 24  # \\boxed{72}"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.decode([*ids, tokenizer.eos_id, *ids]) == text  # stops at EOS


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs the bench extra"
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    import torch
    import transformers

    for arch in ARCHS:
        workdir = _imported(tmp_path, arch)
        hf.export_hf(workdir, str(tmp_path / f"{arch}_hf"))
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}_hf")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / f"{arch}_hf")
        reference = np.load(FIXTURES / arch / "reference.npz")
        with torch.no_grad():
            logits = model(torch.tensor(reference["tokens"])).logits.numpy()
        assert np.abs(logits - reference["logits"]).max() < LOGIT_ATOL
        assert tokenizer.decode(tokenizer.encode("48 + 24")) == "48 + 24"


def _broken_copy(tmp_path: pathlib.Path, edit) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config, folder)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c, f: c.update(architectures=["GPT2LMHeadModel"]), "is not supported"),
        (lambda c, f: c.update(attention_bias=True), "attention_bias=True is not supported"),
        (
            lambda c, f: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
            "rope_type='llama3'",
        ),
        (lambda c, f: c.update(num_hidden_layers=3), "no tensor model.layers.2"),
        (lambda c, f: c.update(intermediate_size=128), "has shape"),
        (lambda c, f: (f / "model.safetensors").unlink(), "no *.safetensors"),
    ],
    ids=["arch", "bias", "rope", "layers", "width", "weights"],
)
def test_import_refuses_what_it_cannot_express_and_writes_nothing(tmp_path, edit, message):
    source = _broken_copy(tmp_path, edit)
    target = tmp_path / "out"
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        hf.import_hf(source, str(target))
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_config_without_tie_word_embeddings_is_untied_as_in_transformers(tmp_path):
    source = _broken_copy(tmp_path, lambda c, f: c.pop("tie_word_embeddings"))
    hf.import_hf(source, str(tmp_path / "untied"))
    cfg, params = restore.load_params(str(tmp_path / "untied"))
    reference = np.load(FIXTURES / "llama" / "reference.npz")
    assert not cfg.tied_embeddings
    assert np.abs(_logits(cfg, params, reference["tokens"]) - reference["logits"]).max() < 1e-4


def test_import_and_export_refuse_a_busy_target_and_a_workdir_without_hf_vocab(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        hf.import_hf(str(FIXTURES / "olmo"), str(busy))
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(MissingFileError, match="no config.json"):
        hf.import_hf(str(tmp_path), str(tmp_path / "new"))
    workdir = _imported(tmp_path, "olmo")
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    config["data"]["vocab"] = "byte"
    (pathlib.Path(workdir) / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="export needs a Hugging Face tokenizer"):
        hf.export_hf(workdir, str(tmp_path / "out"))


def test_cli_prints_one_line_and_exits_2_on_a_mistake(tmp_path):
    command = [sys.executable, "-m", "echo_jax.lm.hf", "import", str(FIXTURES / "llama")]
    command.append(str(tmp_path / "w"))
    ok = subprocess.run(command, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "import: 2 layers x 32 (rms)" in ok.stdout
    bad = subprocess.run(command, capture_output=True, text=True, check=False)  # now not empty
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not empty" in errors[0]


def test_imported_model_end_to_end_on_the_real_benchmarks(tmp_path, shared_data):
    """The tiny imported Llama: GSM8K RL for 2 steps, evaluation on GSM8K, MATH-500 and AIME
    (2 problems each), then export; every stage a `main` job as a user runs it."""
    model, rl = tmp_path / "model", tmp_path / "rl"
    hf.import_hf(str(FIXTURES / "llama"), str(model))
    env = {**cpu_env(), "ECHO_JAX_DATA": str(shared_data)}
    rl_args = {
        "init_from": model,
        "data.prompts": "gsm8k",
        "train.num_steps": 2,
        "rl.prompts_per_step": 2,
        "rl.samples_per_prompt": 2,
        "rl.max_new_tokens": 8,
        "rl.max_prompt_len": 512,  # the fixture's small vocabulary makes prompts long
        "rl.train_batch_size": 4,
        "rl.micro_batch_size": 4,
        "eval.every": 0,
    }
    commands = [main_command("configs/lm_rl.py:grpo", rl, *_overrides(rl_args))]
    for dataset in ("gsm8k", "math500", "aime_all"):
        eval_args = {
            "checkpoint": rl,
            "num_examples": 2,
            "sampling.num_samples": 2,
            "sampling.max_new_tokens": 8,
            "batch_size": 4,
            "mesh.data": 1,
        }
        workdir = tmp_path / f"eval_{dataset}"
        commands.append(
            main_command(f"configs/lm_eval.py:{dataset}", workdir, *_overrides(eval_args))
        )
    for command in commands:
        done = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
    for dataset in ("gsm8k", "math500", "aime_all"):
        result = json.loads((tmp_path / f"eval_{dataset}" / "eval.json").read_text())
        assert result["num_prompts"] == 2, result
    assert restore.latest_step(str(rl)) == 2
    hf.export_hf(str(rl), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def _overrides(values: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in values.items()]
