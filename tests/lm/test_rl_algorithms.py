"""RL maths: group advantages, KL estimators, aggregation weights, clipping, GAE, value clipping,
GRPO == REINFORCE at ratio 1, and Expert Iteration's selection and SFT rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from benchmarks.reference_sampler import score
from echo_jax.core.train_state import TrainState
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.rl import common, expert_iteration, grpo, ppo, reinforce

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_len=16)


def _params(cfg=TINY):
    dummy = jnp.zeros((1, 4), jnp.int32)
    boxed = Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"]
    return nn.meta.unbox(boxed)


def _rollout_inputs(rows=8, prompt=4, new=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(2, TINY.vocab_size, (rows, prompt)).astype(np.int32)
    prompt_lengths = rng.integers(1, prompt + 1, rows).astype(np.int32)
    completions = rng.integers(2, TINY.vocab_size, (rows, new)).astype(np.int32)
    completion_lengths = rng.integers(1, new + 1, rows).astype(np.int32)
    return prompts, prompt_lengths, completions, completion_lengths


# --- Advantages and KL estimators. ---


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_group_advantages_sum_to_zero(name):
    r_QxG = jnp.asarray(np.random.default_rng(0).integers(0, 2, (16, 8)), jnp.float32)
    r_QxG = r_QxG.at[0].set(1.0)  # a flat group: no signal
    adv = common.get("advantage", name)(r_QxG)
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(adv[0], 0.0)
    r = np.asarray(r_QxG)
    expected = r - r.mean(-1, keepdims=True)
    if name == "grpo":
        expected /= r.std(-1, ddof=1, keepdims=True) + 1e-6
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)


def test_kl_estimators_signs_and_zero_at_equality():
    rng = np.random.default_rng(0)
    logp, ref = (jnp.asarray(rng.normal(size=(4, 32)) - 2.0) for _ in range(2))
    assert (common.kl_k3(logp, ref) >= 0).all() and (common.kl_k2(logp, ref) >= 0).all()
    assert (common.kl_k1(logp, ref) < 0).any()  # k1 alone can be negative
    for name in ("k1", "k2", "k3"):
        np.testing.assert_array_equal(common.get("kl", name)(logp, logp), 0.0)


def test_k1_and_k3_estimate_the_true_kl():
    p = jnp.array([0.5, 0.3, 0.2])
    q = jnp.array([0.2, 0.3, 0.5])
    true_kl = float(jnp.sum(p * jnp.log(p / q)))
    tokens = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
    logp, ref = jnp.log(p)[tokens], jnp.log(q)[tokens]
    for name in ("k1", "k3"):  # unbiased; k2 is not
        assert abs(float(common.get("kl", name)(logp, ref).mean()) - true_kl) < 0.01


def test_defaults_are_the_studys():
    g, p, e = grpo.GRPOConfig(), ppo.PPOConfig(), expert_iteration.EIConfig()
    r = g.rollout
    assert (r.prompts_per_step, r.samples_per_prompt, r.temperature) == (64, 8, 0.7)
    assert (g.advantage, g.kl_estimator) == ("grpo", "k3")
    assert (g.loss.eps_low, g.loss.eps_high) == (0.2, 0.2)
    assert g.loss.aggregation == "seq_mean_token_mean"  # OpenRLHF's masked_mean(-1).mean()
    assert (p.gamma, p.lam, p.value_clip, p.kl_estimator) == (1.0, 0.95, 0.2, "k1")
    assert (g.optim.lr, p.actor_optim.lr, p.critic_optim.lr) == (1e-6, 1e-6, 7e-6)
    assert (e.rollout.samples_per_prompt, e.rollout.temperature, e.rollout.top_p) == (64, 1.0, 0.95)
    assert (e.optim.lr, e.rollout.epochs, e.rollout.train_batch_size) == (1e-4, 2, 256)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        common.get("kl", "k4")
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        common.PolicyLossConfig(aggregation="sequence")
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        grpo.GRPOConfig(rollout=common.RolloutConfig(samples_per_prompt=1, train_batch_size=64))


# --- Aggregation and the clipped surrogate. ---


def test_aggregation_weighs_long_and_short_responses_as_documented():
    """Row 0 answers in 1 token, row 1 in 3; d(sum / normaliser) / d(loss_t) is token t's weight."""
    mask = jnp.array([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0]], jnp.float32)
    max_len = 4
    expected = {
        "token_mean": ([1 / 4], [1 / 4] * 3),  # every token equal: the long row weighs 3x
        "seq_mean_token_mean": ([1 / 2], [1 / 6] * 3),  # every row 1/2: short tokens weigh more
        "seq_mean_token_sum_norm": ([1 / 8], [1 / 8] * 3),  # constant 1 / (rows * max_len)
    }
    for name, (short, long) in expected.items():
        aggregate = common.get("aggregation", name)
        weights = jax.grad(lambda x: jnp.divide(*aggregate(x, mask, max_len)))(jnp.ones_like(mask))
        np.testing.assert_allclose(weights[0, 1:2], short, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(weights[1, 1:4], long, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(weights * (1 - mask), 0.0)
        # Micro-batches aggregate exactly: sum the sums and the normalisers of each row.
        loss = jnp.arange(10.0).reshape(2, 5)
        parts = [aggregate(loss[i : i + 1], mask[i : i + 1], max_len) for i in range(2)]
        full = aggregate(loss, mask, max_len)
        np.testing.assert_allclose(
            sum(p[0] for p in parts) / sum(p[1] for p in parts), full[0] / full[1], rtol=1e-6
        )


def test_clipping_zeroes_the_gradient_only_in_the_clipped_direction():
    ratio = jnp.array([1.5, 0.5, 0.5, 1.5, 1.1, 1.25])
    adv = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])

    def grads(eps_high):
        loss = lambda logp: common.clipped_policy_loss(logp, jnp.zeros(6), adv, 0.2, eps_high)
        return jax.grad(lambda logp: loss(logp)[0].sum())(jnp.log(ratio)), loss(jnp.log(ratio))[1]

    g, clipped = grads(0.2)
    # A > 0 above 1 + eps and A < 0 below 1 - eps are clipped: zero gradient.
    np.testing.assert_array_equal(clipped, [True, True, False, False, False, True])
    np.testing.assert_array_equal(g[clipped], 0.0)
    # Elsewhere the gradient of -r A w.r.t. log r is -r A (moving back towards 1 is not clipped).
    np.testing.assert_allclose(g[~clipped], -(ratio * adv)[~clipped], rtol=1e-6)
    g_high, clipped_high = grads(0.28)  # DAPO clip-higher lets 1.25 through for A > 0
    assert not clipped_high[5] and g_high[5] == pytest.approx(-1.25)


def test_grpo_gradient_equals_reinforce_at_ratio_one():
    """beta = 0, old log-probs = current ones: the clipped surrogate's gradient is REINFORCE's,
    -sum_bt w_bt A_b grad log p_bt, with w_bt the aggregation weight (float32, rtol 1e-4)."""
    params, model = _params(), Transformer(TINY)
    prompts, prompt_lengths, completions, completion_lengths = _rollout_inputs()
    rewards = jnp.array([1, 0, 0, 1, 0, 0, 0, 1], jnp.float32)  # Q = 2 groups of G = 4
    rollout_cfg = common.RolloutConfig(
        prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=6,
        train_batch_size=8,
        micro_batch_size=4,
        temperature=1.0,
    )
    cfg = grpo.GRPOConfig(rollout=rollout_cfg)
    rollout, _ = jax.jit(grpo.make_prepare_fn(model, cfg))(
        TrainState.create(params, cfg.optim.make(10)),
        None,
        prompts,
        prompt_lengths,
        completions,
        completion_lengths,
        rewards,
    )
    assert rollout.ref_logp_BxT is None  # beta = 0: no reference pass at all
    r = np.asarray(rewards).reshape(2, 4)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()

    @jax.jit
    def reinforce_grad(p, weights_BxT):
        def loss(p):
            logits, _ = model.apply(
                {"params": p}, rollout.tokens_BxT, rollout.positions_BxT, rollout.segment_ids_BxT
            )
            logp = jax.nn.log_softmax(logits[:, :-1], -1)
            logp = jnp.take_along_axis(logp, rollout.tokens_BxT[:, 1:, None], -1)[..., 0]
            return -jnp.sum(weights_BxT[:, 1:] * adv[:, None] * logp)

        return jax.grad(loss)(p)

    mask = np.asarray(rollout.mask_BxT)
    # The two token weightings that differ in shape (Dr. GRPO's is token_mean's up to a constant,
    # see the aggregation test).
    weights = {
        "token_mean": mask / mask.sum(),
        "seq_mean_token_mean": mask / mask.sum(1, keepdims=True) / len(mask),
    }
    for aggregation, weights_BxT in weights.items():
        cfg = grpo.GRPOConfig(
            rollout=rollout_cfg, loss=common.PolicyLossConfig(aggregation=aggregation)
        )
        grads, stats = jax.jit(
            lambda p: common.accumulate_gradients(
                grpo.make_loss_fn(model, cfg), p, rollout, micro_batch_size=4
            )
        )(params)
        assert float(stats["clip_fraction"]) == 0.0
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-7, err_msg=aggregation
            ),
            grads,
            reinforce_grad(params, weights_BxT),
        )


def test_sequence_logprobs_match_the_samplers_scoring():
    params, model = _params(), Transformer(TINY)
    prompts, prompt_lengths, completions, completion_lengths = _rollout_inputs(seed=1)
    tokens, positions, segments, mask = common.join_prompt_completion(
        prompts, prompt_lengths, completions, completion_lengths
    )
    logp_BxT, entropy_BxT = common.sequence_logprobs(
        model, params, tokens, positions, segments, temperature=0.7
    )
    logp_BxN = score(
        model, params, prompts, prompt_lengths, completions, completion_lengths, temperature=0.7
    )
    np.testing.assert_allclose((logp_BxT * mask).sum(1), logp_BxN.sum(1), rtol=1e-5)
    assert float(mask.sum()) == float(completion_lengths.sum())
    assert (entropy_BxT >= 0).all() and (entropy_BxT <= np.log(TINY.vocab_size) + 1e-5).all()


# --- PPO. ---


def _gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE over each row's completion span, terminal value 0 after its last token."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        span = np.flatnonzero(mask[b])
        r, v = rewards[b, span], values[b, span]
        for i in range(len(span)):
            total = 0.0
            for k in range(i, len(span)):
                next_v = v[k + 1] if k + 1 < len(span) else 0.0
                total += (gamma * lam) ** (k - i) * (r[k] + gamma * next_v - v[k])
            advantages[b, span[i]] = total
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_a_python_reference(gamma, lam):
    rng = np.random.default_rng(int(gamma * 100 + lam * 10))
    B, T = 5, 12
    starts, lengths = rng.integers(1, 5, B), rng.integers(1, 8, B)
    mask = (np.arange(T) >= starts[:, None]) & (np.arange(T) < (starts + lengths)[:, None])
    mask = mask.astype(np.float32)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    advantages, returns = ppo.gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam
    )
    expected_adv, expected_ret = _gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)


def test_token_rewards_score_on_the_last_token_and_k1_penalty_everywhere():
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1]], jnp.float32)
    kl = jnp.full((2, 4), 2.0)
    rewards = ppo.token_rewards(jnp.array([1.0, 0.0]), kl, mask, kl_coef=0.1)
    np.testing.assert_allclose(rewards, [[0, -0.2, 0.8, 0], [0, 0, -0.2, -0.2]], rtol=1e-6)


def test_value_clipping():
    loss = lambda v: ppo.clipped_value_loss(v, jnp.array(0.0), jnp.array(1.0), clip=0.2)
    # Moved 0.5 towards the return: the clipped value (0.2) is further from it, so the loss is
    # the clipped one and the critic gets no gradient for moving beyond the clip range.
    assert float(loss(jnp.array(0.5))) == pytest.approx(0.5 * 0.8**2)
    assert float(jax.grad(loss)(jnp.array(0.5))) == 0.0
    # Moved away from the return: the unclipped error is larger and keeps its gradient.
    assert float(loss(jnp.array(-0.5))) == pytest.approx(0.5 * 1.5**2)
    assert float(jax.grad(loss)(jnp.array(-0.5))) == pytest.approx(-1.5)


def test_value_model_trunk_comes_from_the_policy():
    params = _params()
    dummy = jnp.zeros((1, 4), jnp.int32)
    critic = ppo.ValueModel(TINY)
    critic_params = nn.meta.unbox(critic.init(jax.random.key(1), dummy, dummy, dummy + 1)["params"])
    assert set(critic_params) == (set(params) | {"value_head"})
    copied = ppo.critic_params_from_policy(params, critic_params)
    np.testing.assert_array_equal(copied["block_0"]["attn"]["q"], params["block_0"]["attn"]["q"])
    values = ppo.token_values(critic, copied, dummy + 3, jnp.arange(4)[None], dummy + 1)
    np.testing.assert_array_equal(values, 0.0)  # zero head
    std = 1.0 / (TINY.d_model + 1)  # the study's head: N(0, 1 / (d + 1)^2)
    study = ppo.ValueModel(TINY, head_std=std)
    head = study.init(jax.random.key(1), dummy, dummy, dummy + 1)["params"]["value_head"]
    head = np.asarray(nn.meta.unbox(head))
    assert 0.5 * std < head.std() < 1.5 * std and np.any(head != 0)


# --- Expert Iteration. ---


class _Bytes:
    """The byte vocabulary's encoding (ids offset by 3, EOS 1) without importing seqio."""

    eos_id = 1

    @staticmethod
    def encode(text):
        return [b + 3 for b in text.encode()]


def test_ei_keeps_one_correct_copy_per_prompt_and_text():
    keys = ["q1", "q1", "q1", "q2", "q2", "q1"]
    texts = ["a", "a", "b", "a", "c", "c"]
    correct = [True, True, True, True, False, False]
    assert expert_iteration.select_expert_samples(keys, texts, correct) == [0, 2, 3]


def test_sft_rows_train_on_the_completion_and_eos_only():
    row = expert_iteration.sft_example(_Bytes, "Q?", "42", seq_len=10)
    prompt = _Bytes.encode("Q?\n\n")
    np.testing.assert_array_equal(row["inputs"][:6], prompt + _Bytes.encode("42"))
    np.testing.assert_array_equal(row["targets"][:6], prompt[1:] + _Bytes.encode("42") + [1])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 6 + [0] * 4)
    batches = list(expert_iteration.sft_batches([row] * 3, 2, np.random.default_rng(0)))
    assert len(batches) == 2 and batches[1]["loss_mask"][1].sum() == 0  # padded with an empty row


def test_sft_step_lowers_the_completion_loss():
    params, model = _params(), Transformer(TINY)
    rows = [expert_iteration.sft_example(_Bytes, "Q?", "7", seq_len=8)]
    batch = next(expert_iteration.sft_batches(rows * 4, 4, np.random.default_rng(0)))
    batch |= {k: batch[k] % TINY.vocab_size for k in ("inputs", "targets")}  # fit the tiny vocab
    tx = common.OptimConfig(lr=1e-2, warmup_ratio=0.0).make(20)
    state = TrainState.create(params, tx)
    step = jax.jit(expert_iteration.make_sft_step(model, tx, micro_batch_size=2))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and float(metrics["target_tokens"]) == 4 * 2  # "7" and EOS


def test_ratio_metrics_are_one_and_zero_on_policy_and_move_after_an_update():
    """clip_fraction, approx_kl (KL behaviour || policy) and ratio_max of a second update."""
    params, model = _params(), Transformer(TINY)
    rollout_cfg = common.RolloutConfig(
        prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6, train_batch_size=8
    )
    cfg = grpo.GRPOConfig(rollout=rollout_cfg, loss=common.PolicyLossConfig(eps_low=0.01))
    rewards = jnp.array([1, 0, 0, 1, 0, 0, 0, 1], jnp.float32)
    rollout, _ = jax.jit(grpo.make_prepare_fn(model, cfg))(
        TrainState.create(params, cfg.optim.make(10)), None, *_rollout_inputs(), rewards
    )
    stats_of = jax.jit(
        lambda p: common.finish_stats(
            common.accumulate_gradients(grpo.make_loss_fn(model, cfg), p, rollout, 4)[1]
        )
    )
    first = stats_of(params)
    assert float(first["ratio_max"]) == pytest.approx(1.0)
    assert abs(float(first["approx_kl"])) < 1e-6 and float(first["clip_fraction"]) == 0.0
    grads = jax.grad(
        lambda p: common.accumulate_gradients(grpo.make_loss_fn(model, cfg), p, rollout, 4)[1][
            "loss"
        ]
    )(params)
    moved = stats_of(jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
    assert float(moved["ratio_max"]) > 1.01 and float(moved["approx_kl"]) > 1e-5
    assert float(moved["clip_fraction"]) > 0.0


def test_reinforce_scores_returns_and_whitening():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(reinforce.reinforce_baseline_scores(r), [[0.5, -0.5, -0.5, 0.5]])
    # leave one out: 1 - (1/3), 0 - (2/3)
    np.testing.assert_allclose(reinforce.rloo_scores(r), [[2 / 3, -2 / 3, -2 / 3, 2 / 3]], 1e-6)
    mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], jnp.float32)
    rewards = jnp.array([[9, 1, 2, 3, 9], [9, 9, 1, 1, 1]], jnp.float32)
    np.testing.assert_allclose(
        reinforce.returns_to_go(rewards, mask), [[0, 6, 5, 3, 0], [0, 0, 3, 2, 1]]
    )


def test_token_mean_per_microbatch_averages_the_micro_batch_means():
    """The study's aggregation: micro-batch 0 = row 0 (1 token), micro-batch 1 = row 1 (3)."""
    mask = jnp.array([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0]], jnp.float32)
    loss = jnp.array([[0, 6.0, 0, 0, 0], [0, 1.0, 2.0, 3.0, 0]])
    aggregate = common.get("aggregation", "token_mean_per_microbatch")
    parts = [aggregate(loss[i : i + 1], mask[i : i + 1], 4) for i in range(2)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert float(total) == pytest.approx((6.0 + 2.0) / 2)  # not the token mean 12 / 4
