"""Pretraining a decoder-only transformer from scratch on a mixture of solution styles.

Variants: `tiny` (learns on 2 CPU cores in minutes; the README's default), `small` and `base`
(the size ladder for scale experiments), `150m` and `1b` (the study's OLMo shapes, for TPU).

`tiny`, `small` and `base` differ only in width and depth (and the peak learning rate, which
shrinks with width as usual): the same levels, mixture, examples, sequence length, batch and
steps (so the same tokens seen) and the same architecture options, so a difference between them
is the model's size. Of the study's choices they keep its three-style mixture and next-token
pretraining from scratch; they differ in taking the loss on the solution tokens only
(`data.loss_on="solution"`; the study: every token, `"all"`), synthetic problems instead of the
real sets, RMSNorm instead of OLMo's LayerNorm, and "smear keys" (RESULTS.md).

`150m` and `1b` read the study's real sets (`data.source="real"`: the files
`python -m echo_jax.lm.data.download` writes, each repeated as the mixture says, loss on every
token). The study tokenized with Llama-2's tokenizer: point `data.vocab` at a folder holding its
`tokenizer.json` and `tokenizer_config.json` (`--config.data.vocab=hf:/path/Llama-2-7b-hf`); its
general math text (FineMath-3+, Algebraic-Stack) is not part of these mixtures.

    python -m echo_jax.main --config=configs/lm_pretrain.py:tiny --workdir=runs/pretrain
"""

import ml_collections

from echo_jax.core.config import check_variant, resume_options

VARIANTS = ("tiny", "small", "base", "150m", "1b")

# d_model, n_layers, n_heads, mlp_dim, seq_len, batch_size, lr, warmup, num_steps
_SIZES = {
    "tiny": (128, 4, 4, 512, 256, 16, 3e-3, 100, 1200),
    "small": (256, 6, 8, 1024, 256, 16, 2e-3, 100, 1200),
    "base": (512, 8, 8, 2048, 256, 16, 1e-3, 100, 1200),
    "150m": (768, 12, 12, 3072, 2048, 512, 1e-3, 5000, 100000),
    "1b": (2048, 16, 16, 8192, 2048, 512, 1e-3, 5000, 100000),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "lm_pretrain")
    d_model, n_layers, n_heads, mlp_dim, seq_len, batch_size, lr, warmup, steps = _SIZES[variant]
    study_scale = variant in ("150m", "1b")
    c = ml_collections.ConfigDict()
    c.kind = "lm_pretrain"
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.mixture = "tg_omi1_omi2"  # a preset of echo_jax.lm.data.mixtures.MIXTURES
    # "synthetic": generated problems; "real": the study's TinyGSM / OMI1 / OMI2 files as
    # `python -m echo_jax.lm.data.download` writes them into `data.real_dir` (default
    # $ECHO_JAX_DATA/pretrain), each repeated as the mixture says (lm/data/pretrain_files.py)
    c.data.source = "real" if study_scale else "synthetic"
    c.data.real_dir = ""
    c.data.levels = (1, 2) if not study_scale else (1, 2, 3, 4)  # arithmetic steps
    c.data.seq_len = seq_len  # no example is truncated at these lengths (SentencePiece tokens)
    # SentencePiece (1024 pieces, digits split) makes examples ~3x shorter than bytes: the tiny
    # model sees ~3x more problems per second (benchmarks/RESULTS.md). "byte" is the alternative.
    c.data.vocab = "spm"
    c.data.examples_per_style = 100_000 if study_scale else 20_000
    c.data.loss_on = "all" if study_scale else "solution"  # the study's OLMo: every token
    # The share of OMI1 code blocks ending in print(answer) instead of a bare expression: the
    # study's OMI1 example ends notebook-style (its grader eval's the last line; a print gives
    # None, never rewarded). 1.0 renders every block as echo_jax did before session 8.
    c.data.omi1_print_share = 0.0
    c.data.eval_examples = 64  # per style, for the validation loss

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 32_000 if study_scale else 1024  # >= the vocabulary's size
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = n_heads
    c.model.mlp_dim = mlp_dim
    c.model.max_len = seq_len
    c.model.norm = "layernorm" if study_scale else "rms"
    c.model.norm_eps = 1e-5 if study_scale else 1e-6  # OLMo's LayerNorm: 1e-5
    c.model.n_kv_heads = 0  # grouped-query attention (Llama); 0: one key/value head per head
    c.model.clip_qkv = 0.0  # OLMo's optional clamp of q, k, v; 0: off
    c.model.tied_embeddings = variant != "150m"
    c.model.smear_keys = not study_scale  # a copying shortcut small models need (RESULTS.md)
    c.model.rope_theta = 10_000.0
    c.model.init_std = 0.02
    c.model.dtype = "bfloat16" if study_scale else "float32"
    c.model.remat = study_scale
    # Where training attention runs through XLA (several devices, or kernels="xla"): query
    # blocks of 128 that skip the masked upper triangle (lm/attention.py's `blocked_attention`,
    # with its hand-written backward pass), the fastest block size measured for tiny and small on
    # the 2-core CPU (benchmarks/RESULTS.md); 0 (dense) for the TPU shapes.
    c.model.attention_block = 0 if study_scale else 128
    # "auto": a one-device CPU step runs lm/cpu's C++ kernels and custom VJPs (faster on CPU,
    # benchmarks/RESULTS.md); "xla": never. Single ops: kernel_overrides, see lm/cpu/ops.py.
    c.model.kernels = "auto"
    c.model.kernel_overrides = ()

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = steps
    c.train.batch_size = batch_size  # global, in packed rows of seq_len tokens
    c.train.lr = lr
    c.train.warmup_steps = warmup
    c.train.min_lr_ratio = 0.1
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    if study_scale:
        c.mesh.data, c.mesh.fsdp = 1, -1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("kv", None),
        ("norm", None),
        ("length", None),
        ("act_embed", None),
    )
    c.resume = resume_options()
    return c
