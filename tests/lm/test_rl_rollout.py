"""The RL step end to end on a tiny random model (host stage, then the algorithm's pure train
step): GRPO and PPO steps report their metrics without recompiling, and an Expert Iteration step
fine-tunes on what it kept."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from echo_jax.core.config import load_config
from echo_jax.lm import grading
from echo_jax.lm import sampler as sampler_lib
from echo_jax.lm.data import generators, vocab
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import policy_eval
from tests.conftest import REPO

CFG = ModelConfig(vocab_size=264, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_len=512)
# 2 prompts x 2 samples, 2 rows per optimizer step: 2 updates per rollout
ROLLOUT = [
    "rl.prompts_per_step=2",
    "rl.samples_per_prompt=2",
    "rl.max_new_tokens=8",
    "rl.max_prompt_len=384",
    "rl.train_batch_size=2",
    "rl.micro_batch_size=1",
    "rl.temperature=1.0",
    "rl.lr=1e-3",
    "rl.critic_lr=1e-3",
]
ROLLOUT_KEYS = {
    "reward_mean",
    "accuracy",
    "response_length",
    "entropy",
    "clip_fraction",
    "loss",
    "time/rollout",
    "time/reward",
} | {f"style_share/{s}" for s in grading.STYLE_LABELS}


def _config(variant: str, *overrides: str):
    return load_config(f"{REPO}/configs/lm_rl.py:{variant}", [*ROLLOUT, *overrides])


def _run_steps(config, params, source, vocabulary, num_steps: int):
    """`num_steps` RL steps as the loop runs them (host stage, then the jitted train step)."""
    algo = rl_job.build_algorithm(config, CFG, vocabulary)
    sampler = sampler_lib.Sampler(CFG, eos_id=vocabulary.eos_id)
    host_stage = rl_job.make_host_stage(config, algo, sampler)
    state = jax.jit(lambda rng: nn.meta.unbox(algo.init_state(rng)))(jax.random.key(1))
    state = algo.warm_start(state, params)
    train_step = jax.jit(algo.train_step, donate_argnums=0)
    stream = rl_job.prompt_stream(source, 0, algo.rollout.prompts_per_step)
    rows = []
    for step in range(num_steps):
        stage_rng, step_rng = jax.random.split(jax.random.fold_in(jax.random.key(2), step))
        batch, host_metrics = host_stage(state, next(stream), stage_rng)
        state, metrics = train_step(state, batch, step_rng)
        rows.append({"step": step + 1, **jax.device_get(metrics), **host_metrics})
    return state, rows, algo, train_step


@pytest.fixture(scope="module")
def setup():
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(
        Transformer(CFG).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"]
    )
    source = generators.ProblemSource("rl", seed=0, levels=(1,), size=8)
    return params, vocab.get_vocabulary("byte"), source


@pytest.fixture
def alternate_rewards(monkeypatch):
    """Real grading, then every other row marked correct and labelled "tinygsm" (a random model
    is never right, and all-zero rewards would leave nothing to learn)."""
    real = grading.grade_batch

    def grade_batch(texts, refs, **kwargs):
        graded = real(texts, refs, **kwargs)
        return [
            grading.Graded("tinygsm" if i % 2 == 0 else g.style, g.answer, i % 2 == 0, g.status)
            for i, g in enumerate(graded)
        ]

    monkeypatch.setattr(grading, "grade_batch", grade_batch)


def _changed(before, after):
    return any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )


def test_grpo_steps_report_metrics_without_recompiling(setup, alternate_rewards):
    params, vocabulary, source = setup
    config = _config("grpo", "rl.kl_coef=1e-3")
    compiled = sampler_lib._generate._cache_size()  # one cache for every Sampler
    state, rows, algo, train_step = _run_steps(config, params, source, vocabulary, 2)
    assert [r["step"] for r in rows] == [1, 2]
    assert ROLLOUT_KEYS | {"kl", "flat_groups"} <= set(rows[-1])
    assert all(np.isfinite(v) for v in rows[-1].values())
    assert rows[-1]["accuracy"] == 0.5 and rows[-1]["style_share/tinygsm"] >= 0.5
    assert rows[-1]["style_accuracy/tinygsm"] > 0 and rows[-1]["flat_groups"] == 0.0
    assert int(state.step) == 2 * algo.rollout.updates_per_step == 4
    assert _changed(params, state.params) and not _changed(params, state.ref_params)
    assert train_step._cache_size() == 1  # fixed shapes: one compile for every step
    assert sampler_lib._generate._cache_size() == compiled + 1


@pytest.mark.parametrize("variant", ["reinforce", "rloo"])
def test_reinforce_steps_put_the_kl_in_the_reward(setup, alternate_rewards, variant):
    params, vocabulary, source = setup
    config = _config(variant, "rl.kl_coef=1e-2")
    state, rows, algo, _ = _run_steps(config, params, source, vocabulary, 2)
    assert ROLLOUT_KEYS | {"kl", "flat_groups", "approx_kl", "ratio_max"} <= set(rows[-1])
    assert all(np.isfinite(v) for v in rows[-1].values())
    assert algo.cfg.kl_estimator == "k1" and algo.cfg.baseline in ("reinforce_baseline", "rloo")
    assert int(state.step) == 4 and state.critic is None
    assert _changed(params, state.params) and not _changed(params, state.ref_params)


def test_ppo_step_reports_value_loss(setup, alternate_rewards):
    params, vocabulary, source = setup
    state, rows, _, _ = _run_steps(_config("ppo", "rl.log_kl=False"), params, source, vocabulary, 1)
    assert ROLLOUT_KEYS | {"value_loss", "value_mean"} <= set(rows[0])
    assert "kl" not in rows[0] and state.ref_params is None  # beta = 0: no reference model
    assert _changed(params, state.params) and int(state.critic.step) == 2


def test_expert_iteration_step_fine_tunes_on_kept_samples(setup, monkeypatch):
    params, vocabulary, source = setup

    def one_correct_text(texts, refs, **kwargs):  # a random model is never right
        return [grading.Graded("omi2", "1", True, "ok") for _ in texts]

    monkeypatch.setattr(grading, "grade_batch", one_correct_text)
    config = _config("ei_online", "rl.train_batch_size=4", "rl.micro_batch_size=2", "rl.epochs=1")
    state, rows, _, _ = _run_steps(config, params, source, vocabulary, 1)
    assert 0 < rows[0]["kept"] <= 4 and rows[0]["accuracy"] == 1.0
    assert np.isfinite(rows[0]["loss"]) and rows[0]["loss"] > 0 and _changed(params, state.params)
    assert int(state.step) == 1  # one SFT batch of 4 rows holds everything kept


def test_expert_iteration_step_without_kept_samples_changes_nothing(setup, monkeypatch):
    params, vocabulary, source = setup
    monkeypatch.setattr(
        grading,
        "grade_batch",
        lambda texts, refs, **kwargs: [grading.Graded("omi2", "1", False, "ok") for _ in texts],
    )
    state, rows, _, _ = _run_steps(
        _config("ei_online", "rl.train_batch_size=4"), params, source, vocabulary, 1
    )
    assert rows[0]["kept"] == 0 and rows[0]["loss"] == 0 and int(state.step) == 0
    assert not _changed(params, state.params)


def test_evaluation_during_rl_reads_the_dataset_rl_trains_on(shared_data):
    vocabulary = vocab.get_vocabulary("byte")
    config = _config("grpo", "eval.levels=(1, 3)", "eval.per_level=3")
    dataset, groups, trained = policy_eval.eval_groups(config, vocabulary)
    assert (dataset, sorted(groups), trained) == ("synthetic", ["L1", "L3"], ["L1"])
    if not (shared_data / "gsm8k" / "test.jsonl").exists():
        pytest.skip("GSM8K is not in $ECHO_JAX_DATA")
    config = _config("grpo", "data.prompts=gsm8k", "eval.per_level=3")
    dataset, groups, trained = policy_eval.eval_groups(config, vocabulary)
    assert (dataset, list(groups), trained) == ("gsm8k", ["gsm8k"], ["gsm8k"])
    assert len(groups["gsm8k"]) == 3 and all("solution" in q for q in groups["gsm8k"])


def test_overlong_filter_drops_cut_off_completions_from_the_loss(setup):
    _, vocabulary, _ = setup
    sample = None
    for flag in (False, True):
        algo = rl_job.build_algorithm(
            _config("grpo", f"rl.overlong_filter={flag}"), CFG, vocabulary
        )
        sample = rl_job.placeholder_sample(algo.rollout)
        info = dataclasses.replace(sample.info, stopped=np.array([True, False, True, False]))
        sample = dataclasses.replace(sample, completion_lengths_B=np.full(4, 8), info=info)
        batch, metrics = algo.batch(sample, np.random.default_rng(0))
        expected = [8, 0, 8, 0] if flag else [8, 8, 8, 8]
        assert batch["completion_lengths_B"].tolist() == expected
        assert metrics == ({"overlong_filtered": 0.5} if flag else {})


def test_dynamic_sampling_replaces_flat_groups_with_fresh_prompts(setup, monkeypatch):
    """Prompt 0 of every rollout is all-correct (flat), prompt 1 mixed: one extra round keeps
    the two mixed groups, from two rollouts."""
    params, vocabulary, source = setup
    real = grading.grade_batch

    def grade_batch(texts, refs, **kwargs):
        graded = real(texts, refs, **kwargs)
        return [  # rows 0, 1: group 0 (both right); rows 2, 3: group 1 (one right)
            grading.Graded(g.style, g.answer, i % 4 in (0, 1, 2), g.status)
            for i, g in enumerate(graded)
        ]

    monkeypatch.setattr(grading, "grade_batch", grade_batch)
    config = _config("grpo", "rl.dynamic_sampling=2")
    algo = rl_job.build_algorithm(config, CFG, vocabulary)
    sampler = sampler_lib.Sampler(CFG, eos_id=vocabulary.eos_id)
    stream = rl_job.prompt_stream(source, 0, algo.rollout.prompts_per_step)
    host_stage = rl_job.make_host_stage(config, algo, sampler, more_prompts=stream)
    state = jax.jit(lambda rng: nn.meta.unbox(algo.init_state(rng)))(jax.random.key(1))
    state = algo.warm_start(state, params)
    first = next(stream)
    batch, metrics = host_stage(state, first, jax.random.key(3))
    assert metrics["dynamic/rounds"] == 2.0 and metrics["dynamic/flat_kept"] == 0.0
    assert batch["rewards_B"].tolist() == [1.0, 0.0, 1.0, 0.0]  # two mixed groups
    assert metrics["accuracy"] == 0.5
