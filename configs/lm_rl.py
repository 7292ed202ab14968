"""RL post-training of a pretrained checkpoint: GRPO, PPO, REINFORCE-baseline, RLOO or Expert
Iteration (STUDIES.md A).

Variants `grpo`, `ppo`, `reinforce`, `rloo`, `ei_online` fit the `tiny` pretrained model on 2
CPU cores (a step is seconds, the run a few minutes); `ei` is Expert Iteration as the study ran
it, rounds over the whole prompt set (kind "lm_ei", `echo_jax/lm/jobs/ei_rounds.py`; about 10
minutes). The study's values are in the comments and in the `echo_jax.lm.rl` config dataclasses.
`study_grpo`, `study_ppo`, `study_reinforce`, `study_ei`: the study's settings for TPUs
(`_study_values`: GSM8K prompts, 64 x 8 rollouts or 64 samples per question, its grader, 8
chips); without `init_from` the RL ones plan a 1B model
(`python -m echo_jax.plan --config=configs/lm_rl.py:study_grpo`).

    python -m echo_jax.main --config=configs/lm_rl.py:grpo --workdir=runs/rl \
        --config.init_from=runs/pretrain_tiny [--config.rl.kl_coef=1e-3] \
        [--config.data.prompts=gsm8k]

A rerun with the same --workdir resumes from the last checkpoint (policy, critic, optimizer,
reference, RNG and prompt position; EI: the round, its sampled chunks and its fine-tuning); a
finished run does nothing.
"""

import math
import os

import ml_collections

from echo_jax.core.config import check_variant, load_config_file, resume_options

VARIANTS = (
    "grpo",
    "ppo",
    "reinforce",
    "rloo",
    "ei",
    "ei_online",
    "study_grpo",
    "study_ppo",
    "study_reinforce",
    "study_ei",
)
ROUNDS = ("ei", "study_ei")  # Expert Iteration in rounds: its own job, not an RL algorithm
GSM8K_TRAIN = 7473  # questions; the study's runs make 10 passes (episodes) over them


def _pretrain(variant: str) -> ml_collections.ConfigDict:
    return load_config_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), f"lm_pretrain.py:{variant}")
    )


def get_config(variant: str = "grpo") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "lm_rl")
    study = variant.startswith("study_")
    algo = variant.removeprefix("study_")
    pretrain = _pretrain("1b" if study else "tiny")
    c = ml_collections.ConfigDict()
    c.kind = "lm_rl"
    c.algo = algo  # a registered algorithm: echo_jax.lm.rl.algorithm.names()
    c.seed = 0  # sampling, prompt order, critic head
    c.init_from = ""  # a pretraining workdir (required)
    c.init_step = 0  # 0 = its latest checkpoint

    c.data = ml_collections.ConfigDict()
    # "synthetic": the RL split, held out from pretraining; "gsm8k": the train questions (those
    # longer than rl.max_prompt_len tokens are left out: raise it, within the model's max_len)
    c.data.prompts = "synthetic"
    c.data.levels = (1, 2)  # difficulty of the synthetic prompts (the pretraining levels)
    c.data.num_prompts = 4096  # size of the synthetic prompt pool (the study: GSM8K's 7,473)
    c.data.vocab = ""  # filled in from init_from's config.json

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 16  # the study: 64
    c.rl.samples_per_prompt = 8
    c.rl.temperature = 1.0  # the study: 0.7 (PPO, GRPO), 1.0 (EI)
    c.rl.top_p = 0.95 if algo.startswith("ei") else 1.0
    c.rl.max_new_tokens = 176  # the longest level-2 solution has 160 tokens (the study: 1024)
    c.rl.max_prompt_len = 64  # prompts are padded to this: one compiled shape
    # rows per optimizer step: 2 updates per rollout, so the policy moves off the one that sampled
    # and clipping acts (the study: 64 of 512 rows, 8 updates)
    c.rl.train_batch_size = 64
    c.rl.micro_batch_size = 32  # rows in memory at once while accumulating gradients
    c.rl.sampler_batch_size = 0  # rows sampled at once; 0 = the whole rollout
    c.rl.epochs = 1  # passes over each rollout (EI: SFT epochs over the kept samples)
    c.rl.lr = 3e-4  # the study: 1e-6 (PPO, GRPO), 1e-4 (EI), at 150M-1B parameters
    c.rl.critic_lr = 1e-3  # PPO only (the study: 7e-6)
    c.rl.warmup_ratio = 0.0
    c.rl.min_lr_ratio = 1.0  # a constant rate: short runs stop before a decay would matter
    c.rl.kl_coef = 0.0  # the study's grid: 0, 1e-3, 1e-2
    # the study: k1 in the reward (PPO, REINFORCE-baseline), k3 in the loss (GRPO)
    c.rl.kl_estimator = "k3" if algo in ("grpo", "ei_online") else "k1"
    c.rl.log_kl = True  # report KL to the initial policy even when kl_coef = 0 (one more pass)
    c.rl.advantage = "grpo"  # GRPO: "grpo" or "dr_grpo"
    # per-token loss weights: "seq_mean_token_mean" (every response equal), "token_mean",
    # "seq_mean_token_sum_norm" (Dr. GRPO), "token_mean_per_microbatch" (the study's, packed)
    c.rl.aggregation = "seq_mean_token_mean"
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.2  # > eps_low: DAPO's clip-higher (0.28)
    c.rl.overlong_filter = False  # DAPO: completions cut off by max_new_tokens add no loss
    # DAPO's dynamic sampling: up to this many extra sampling rounds replace the groups whose
    # rewards are all equal (0 = off)
    c.rl.dynamic_sampling = 0
    c.rl.gamma = 1.0  # PPO
    c.rl.lam = 0.95  # PPO
    c.rl.value_clip = 0.2  # PPO
    # PPO's value head: "zero" (the critic starts predicting 0), or "study": N(0, 1/(d+1)^2)
    c.rl.value_head_init = "zero"
    c.rl.grade_timeout_s = 2.0  # per generated program, in the sandbox
    # the reward and style labels: "strict" (echo_jax's) or "paper" (the study's math_verifier.py,
    # prompt + completion; `echo_jax/lm/paper_grading.py`), the study presets' choice
    c.rl.grader = "strict"

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 12  # RL steps (rollout -> reward -> update)
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 2
    c.train.log_checkpoints = 0  # also keep this many at log-spaced steps (the study: 15)
    c.train.async_checkpoints = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 6  # RL steps between evaluations (also before the first and after the last)
    c.eval.levels = (1, 2, 3)  # the training difficulty, then harder problems (transfer)
    c.eval.per_level = 32  # held-out test problems per level
    c.eval.num_samples = 4  # for pass@k (greedy pass@1 always)
    c.eval.temperature = 0.7
    c.eval.top_p = 0.95
    c.eval.max_new_tokens = 200  # level-3 solutions reach 194 tokens
    c.eval.batch_size = 64

    # The policy's model when there is no init_from (planning, shape checks); a run takes the
    # model of its init_from checkpoint.
    c.model = pretrain.model
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.sharding = pretrain.sharding  # the pretraining rules: parameters shard over fsdp / tensor
    if study:
        _study_values(c)
    if variant in ROUNDS:
        _expert_iteration_rounds(c, study)
    c.resume = resume_options()
    return c


def _expert_iteration_rounds(c: ml_collections.ConfigDict, study: bool) -> None:
    """Expert Iteration as the study ran it (`openrlhf/cli/train_ei.py`): per round,
    `rl.samples_per_prompt` samples of every prompt (`rl.prompts_per_step` at a time), the
    correct ones deduplicated, `rl.epochs` epochs of fine-tuning in batches of
    `rl.train_batch_size` (lr `rl.lr`, 3 % warm-up, cosine to 0.1x). The RL-only keys go, so
    setting one is an error."""
    c.kind = "lm_ei"
    del c.algo
    for key in (
        "kl_coef kl_estimator log_kl advantage aggregation eps_low eps_high overlong_filter "
        "dynamic_sampling gamma lam value_clip value_head_init critic_lr"
    ).split():
        del c.rl[key]
    del c.train.num_steps, c.train.log_checkpoints, c.eval.every
    c.ei = ml_collections.ConfigDict()
    c.ei.rounds = 3  # the study chains launches; how many it ran is not in its code
    # each round fine-tunes "base" (the init_from model: the study's plain rounds) or "last"
    # (the model the round sampled from: its `_online` rounds)
    c.ei.sft_from = "base"
    c.ei.sft_tokens = 0  # fine-tuning rows are cut to this many tokens; 0 = prompt + new tokens
    r = c.rl
    r.temperature, r.top_p = 1.0, 0.95
    r.warmup_ratio, r.min_lr_ratio = 0.03, 0.1
    r.epochs = 2
    c.train.checkpoint_every = 20  # fine-tuning updates
    if study:  # 64 samples of each of GSM8K's 7,473 questions; SFT rows of 1024 tokens
        # the study asks vLLM for 2048 new tokens, which the 1B model's 2048-token context caps:
        # prompt (at most 256 GSM8K tokens) + completion fit in it
        r.max_prompt_len, r.max_new_tokens = 256, 1792
        r.samples_per_prompt, c.ei.sft_tokens = 64, 1024
        r.prompts_per_step, r.sampler_batch_size = 64, 64
        r.train_batch_size, r.micro_batch_size, r.lr = 256, 8, 1e-4
    else:  # 256 synthetic questions x 8 samples a round (the study: 7,473 x 64)
        c.data.num_prompts = 256
        r.train_batch_size = 64  # the study: 256


def _study_values(c: ml_collections.ConfigDict) -> None:
    """The study's settings (`configs/pretraining_1b_sweeps_ppo_grpo_gsm8k.yaml` of
    rosieyzh/openrlhf-pretrain) on the 1B model, sharded over 8 chips: 64 GSM8K prompts x 8
    samples per rollout, 8 updates of 64 rows, temperature 0.7, 1024 new tokens, lr 1e-6 (critic
    7e-6) with 3 % warm-up and cosine to 0.1x, clip 0.2, gamma 1, lambda 0.95, 10 episodes, its
    grader. Its KL grid is 0, 1e-3, 1e-2 (`--config.rl.kl_coef`); the model comes from
    `init_from` (the `model` block, here 1B, only plans)."""
    r = c.rl
    r.grader = "paper"  # the study's reward and labels
    r.aggregation = "token_mean_per_microbatch"  # the study's loss (its micro-batches are packed)
    r.value_head_init = "study"
    r.prompts_per_step, r.samples_per_prompt = 64, 8
    r.temperature, r.max_new_tokens, r.max_prompt_len = 0.7, 1024, 1024
    r.train_batch_size, r.micro_batch_size = 64, 8  # 8 optimizer steps per rollout
    r.sampler_batch_size = 64  # rows sampled at once: bounds the KV cache per device
    r.lr, r.critic_lr = 1e-6, 7e-6
    r.warmup_ratio, r.min_lr_ratio = 0.03, 0.1
    c.data.prompts = "gsm8k"
    c.train.num_steps = math.ceil(10 * GSM8K_TRAIN / r.prompts_per_step)  # 10 episodes: 1168
    c.train.checkpoint_every = 50
    c.train.log_checkpoints = 15  # the study's save_log_scale_count
    c.mesh.fsdp = 8
