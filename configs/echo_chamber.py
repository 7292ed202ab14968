"""The whole study in miniature, in one command: pretrain on the style mixture -> evaluate ->
RL (GRPO by default) -> evaluate -> `DIR/report.md` with tables and figures (STUDIES.md A).

    python -m echo_jax.main --config=configs/echo_chamber.py:tiny --workdir=runs/echo

Stages run in DIR/pretrain, DIR/eval_before, DIR/rl and DIR/eval_after; each resumes where it was
cut off and a finished stage is skipped on rerun. Each stage's block is its own family's config,
overridden as usual: `--config.rl.algo=ppo --config.rl.rl.kl_coef=1e-3
--config.pretrain.train.num_steps=600`. `seed` is every stage's seed.

Variants: `tiny` (about 6 minutes on 2 idle CPU cores), `smoke` (every stage in seconds: for tests
and the notebook under ECHO_JAX_NB_SMOKE=1; the model learns nothing).
"""

import os

import ml_collections

from echo_jax.core.config import check_variant, load_config_file, resume_options

VARIANTS = ("tiny", "smoke")


def _family(spec: str) -> ml_collections.ConfigDict:
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), spec))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "echo_chamber")
    c = ml_collections.ConfigDict()
    c.kind = "echo_chamber"
    c.variant = variant
    c.seed = 0
    c.pretrain = _family("lm_pretrain.py:tiny")
    c.rl = _family("lm_rl.py:grpo")
    c.eval = _family("lm_eval.py:synthetic")
    for block in (c.pretrain, c.rl, c.eval):  # one `resume` block, the job's, for every stage
        del block["resume"]
    c.resume = resume_options()
    c.eval.synthetic.levels = (1, 2, 3)  # the pretraining levels, then a harder one (transfer)
    c.eval.synthetic.per_level = 32
    c.eval.sampling.num_samples = 8
    c.eval.sampling.max_new_tokens = 200
    c.eval.chunk_prompts = 32
    c.rl.eval.levels = (1, 2)  # greedy pass@1 during RL, for the main figure
    c.rl.eval.num_samples = 0
    c.rl.eval.every = 4
    if variant == "smoke":
        p = c.pretrain
        p.model.d_model, p.model.n_layers, p.model.n_heads, p.model.mlp_dim = 32, 1, 2, 64
        p.data.examples_per_style, p.data.eval_examples = 500, 4
        p.train.num_steps, p.train.batch_size, p.train.warmup_steps = 4, 4, 1
        p.train.log_every, p.train.eval_every, p.train.checkpoint_every = 2, 4, 4
        p.mesh.data = 1
        c.eval.synthetic.levels, c.eval.synthetic.per_level = (1, 2), 2
        c.eval.sampling.num_samples, c.eval.sampling.max_new_tokens = 2, 8
        c.eval.batch_size, c.eval.chunk_prompts, c.eval.mesh.data = 4, 2, 1
        c.rl.train.num_steps, c.rl.train.checkpoint_every, c.rl.eval.every = 2, 1, 1
        r = c.rl.rl
        r.prompts_per_step, r.samples_per_prompt, r.max_new_tokens = 2, 2, 8
        r.train_batch_size, r.micro_batch_size = 2, 2  # 2 updates per rollout
        c.rl.eval.per_level, c.rl.eval.max_new_tokens, c.rl.eval.batch_size = 2, 8, 4
    return c
