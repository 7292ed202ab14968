"""Phases 1 and 2 of the source-bias study: one job that trains every sub-run.

Phase 1 trains every user encoder on human-text (HGC) histories and ranks paired lists (every
candidate in both sources); phase 2 swaps a share rho of history items to AIGC text and retrains
`phases.rho_encoder` per rho. Sub-runs train through the shared loop under WORKDIR/runs/ and are
skipped once finished. Variants share `configs/recsys.py`'s settings: `controlled` (a few
minutes on 2 CPU cores), `beauty637` and `beauty637_clean` (HTML entities undone).

    python -m echo_jax.main --config=configs/source_bias.py:controlled --workdir=runs/bias
"""

import os

import ml_collections

from echo_jax.core.config import check_variant, load_config_file

VARIANTS = ("controlled", "beauty637", "beauty637_clean")
ENCODERS = ("sasrec", "bert4rec", "gru4rec", "lrurec", "mean")


def get_config(variant: str = "controlled") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "source_bias")
    base = "controlled" if variant == "controlled" else "beauty637"
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"recsys.py:{base}"))
    c.kind = "source_bias_phases"
    c.variant = variant
    c.data.clean = variant == "beauty637_clean"
    c.train.num_steps = 150 if base == "controlled" else 200
    c.train.eval_every = 0  # each sub-run is evaluated once, after training
    c.train.checkpoint_every = c.train.num_steps // 2
    c.train.keep_checkpoints = 1

    c.phases = ml_collections.ConfigDict()
    c.phases.encoders = ENCODERS  # phase 1
    c.phases.rho_encoder = "bert4rec"  # phase 2 (the encoder of the study's third-party rerun)
    c.phases.rhos = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    c.phases.seeds = (0,) if base == "controlled" else (0, 1, 2)
    return c
