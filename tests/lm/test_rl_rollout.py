"""The RL loop end to end on a tiny random model: GRPO and PPO steps report their metrics without
recompiling, and an Expert Iteration round fine-tunes on what it kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from echo_jax.lm import grading
from echo_jax.lm import sampler as sampler_lib
from echo_jax.lm.data import generators, vocab
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import common, expert_iteration, grpo, rollout as loop, ppo

CFG = ModelConfig(vocab_size=264, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_len=512)
ROLLOUT = common.RolloutConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8,
                               max_prompt_len=384, train_batch_size=2, micro_batch_size=1,
                               temperature=1.0)
ROLLOUT_KEYS = {"reward_mean", "accuracy", "response_length", "entropy", "clip_fraction", "loss",
                "time/rollout", "time/reward", "time/update"} | {
                    f"style_share/{s}" for s in grading.STYLE_LABELS}
OPTIM = common.OptimConfig(lr=1e-3, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def setup():
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(CFG).init(jax.random.key(0), dummy, dummy, dummy + 1)
                           ["params"])
    source = generators.ProblemSource("rl", seed=0, levels=(1,), size=8)
    return params, vocab.get_vocabulary("byte"), source


@pytest.fixture
def alternate_rewards(monkeypatch):
    """Real grading, then every other row marked correct and labelled "tinygsm" (a random model
    is never right, and all-zero rewards would leave nothing to learn)."""
    real = grading.grade_batch

    def grade_batch(texts, refs, **kwargs):
        graded = real(texts, refs, **kwargs)
        return [grading.Graded("tinygsm" if i % 2 == 0 else g.style, g.answer, i % 2 == 0, g.status)
                for i, g in enumerate(graded)]

    monkeypatch.setattr(grading, "grade_batch", grade_batch)


def _changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                         jax.tree.leaves(after)))


def test_grpo_steps_report_metrics_without_recompiling(setup, alternate_rewards):
    params, vocabulary, source = setup
    cfg = grpo.GRPOConfig(rollout=ROLLOUT, kl_coef=1e-3, optim=OPTIM)
    trainer = loop.RLTrainer("grpo", cfg, CFG, vocabulary, total_steps=2)
    state = trainer.init_state(params, jax.random.key(1))
    compiled = sampler_lib._generate._cache_size()  # one cache for every Sampler
    state, rows = loop.run_rl_steps(trainer, state, params, loop.cycle_problems(source, 0), 2,
                                    jax.random.key(2))
    assert [r["step"] for r in rows] == [1, 2]
    assert ROLLOUT_KEYS | {"kl", "flat_groups"} <= set(rows[-1])
    assert all(np.isfinite(v) for v in rows[-1].values())
    assert rows[-1]["accuracy"] == 0.5 and rows[-1]["style_share/tinygsm"] >= 0.5
    assert rows[-1]["style_accuracy/tinygsm"] > 0 and rows[-1]["flat_groups"] == 0.0
    assert int(state.step) == 2 * ROLLOUT.updates_per_step and _changed(params, state.params)
    assert trainer._update._cache_size() == 1  # fixed shapes: one compile for every update
    assert sampler_lib._generate._cache_size() == compiled + 1


def test_ppo_step_reports_value_loss(setup, alternate_rewards):
    params, vocabulary, source = setup
    cfg = ppo.PPOConfig(rollout=ROLLOUT, actor_optim=OPTIM, critic_optim=OPTIM)
    trainer = loop.RLTrainer("ppo", cfg, CFG, vocabulary, total_steps=1)
    state = trainer.init_state(params, jax.random.key(1))
    state, rows = loop.run_rl_steps(trainer, state, None, loop.cycle_problems(source, 0), 1,
                                    jax.random.key(2))
    assert ROLLOUT_KEYS | {"value_loss", "value_mean"} <= set(rows[0])
    assert "kl" not in rows[0]  # beta = 0: no reference model
    assert _changed(params, state.actor.params) and int(state.critic.step) == 2


def test_expert_iteration_round_fine_tunes_on_kept_samples(setup, monkeypatch):
    params, vocabulary, source = setup

    def all_correct(texts, refs, **kwargs):  # a random model is never right
        return [grading.Graded("omi2", "1", True, "ok") for _ in texts]

    monkeypatch.setattr(grading, "grade_batch", all_correct)
    cfg = expert_iteration.EIConfig(samples_per_prompt=2, max_new_tokens=8, max_prompt_len=384,
                                    prompts_per_batch=2, rounds=1, epochs=1, batch_size=4,
                                    micro_batch_size=2, seq_len=400)
    problems = [source[i] for i in range(3)]  # the second sampling batch holds one repeat
    new_params, rows = expert_iteration.run_expert_iteration(
        cfg, CFG, params, problems, vocabulary, jax.random.key(3))
    assert 0 < rows[0]["kept"] <= 6 and rows[0]["accuracy"] == 1.0
    assert np.isfinite(rows[0]["sft_loss"]) and _changed(params, new_params)
