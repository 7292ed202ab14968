"""Evaluating a pretrained (or RL-tuned) checkpoint: greedy pass@1, pass@k, maj@k, style shares.

Variants name the dataset: `synthetic` (held-out generated problems, reported per difficulty
level), `gsm8k` (test, 1319), `math500`, `aime24`, `aime25`, `aime_all` (files under
$ECHO_JAX_DATA).

    python -m echo_jax.main --config=configs/lm_eval.py:gsm8k --workdir=runs/eval_gsm8k \
        --config.checkpoint=runs/pretrain

A rerun with the same --workdir resumes: prompts already in samples.jsonl are skipped.
"""

import ml_collections

from echo_jax.core.config import check_variant, resume_options

VARIANTS = ("synthetic", "gsm8k", "math500", "aime24", "aime25", "aime_all")


def get_config(variant: str = "synthetic") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "lm_eval")
    c = ml_collections.ConfigDict()
    c.kind = "lm_eval"
    c.variant = variant
    c.seed = 0  # sampling, and which synthetic problems are drawn
    c.dataset = variant
    c.checkpoint = ""  # a pretraining workdir or its checkpoints/ folder (required)
    c.checkpoint_step = 0  # 0 = the latest
    # every checkpoint of the run, each in WORKDIR/step_<n>, with metrics against the step (log x)
    c.all_checkpoints = False
    c.num_examples = 0  # evaluate the first N prompts only; 0 = all

    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.levels = (1, 2, 3, 4)  # arithmetic steps; each level is reported on its own
    c.synthetic.per_level = 100  # test-split problems per level

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_samples = 64  # n for pass@k / maj@k (the study: 64); 0 = greedy only
    c.sampling.temperature = 0.7
    c.sampling.top_p = 0.95
    c.sampling.top_k = 0  # 0 = off
    c.sampling.max_new_tokens = 0  # 0 = the model's max_len

    c.batch_size = 64  # sequences per sampler call (global); a multiple of the data shards
    c.chunk_prompts = 16  # prompts generated, graded and appended to samples.jsonl at a time
    c.grading_timeout_s = 2.0  # per generated program, in the sandbox
    c.grader = "strict"  # or "paper": the study's math_verifier.py (echo_jax/lm/paper_grading.py)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = (("batch", ("data", "fsdp")),)  # params replicated; the batch is split
    c.resume = resume_options()
    return c
