"""The source-bias study: phases 1 and 2 (`controlled`, `beauty637`, `beauty637_clean`), the
whole three-phase study with the feedback loop and the debiaser (`loop`, `beauty637_loop`), and
the mechanism behind it (`mechanism`).

`controlled` variants use the calibrated synthetic catalogue (`recsys/calibrated.py`: latent
content, a noisy human copy, an LLM rewrite that removes each noise edit with probability
`data.denoise` and adds praise with probability `data.praise`, constants fitted to Beauty-637)
and frozen MiniLM item vectors; they need no data folder. Phase variants train every sub-run of
phases 1 and 2. Loop variants run phases 1 and 2, then phase 3, the feedback loop, without and
with the black-box debiaser (`debias.alpha`, `debias.beta`; both 0 runs only the undebiased loop)
over `loop.seeds`, and write `WORKDIR/report.md`: `loop` (full size), `loop_small` (a few
minutes; the notebook's), `loop_smoke` (seconds; tests) and `beauty637_loop` (needs
`ECHO_JAX_DATA`). All share `configs/recsys.py`'s settings.

The `*_study` variants use the study's settings where echo_jax has them as options
(`Yuqi-Zhou/Rec_SourceBias`, STUDIES.md B): no item-side parameters (score = dot(user, frozen
vector), so users are as wide as the vectors), the study's pooling (the mean over a 100-token
padded window, not normalised), one negative drawn from the four shown, batch 256, 3 epochs, lr
1e-3 with wd 1e-5, and phase 2 without retraining at rho = 0, 0.1, ..., 1. Still ours: MiniLM
(384 wide) for the study's bert-base-uncased (768), SASRec's inner width 2 x 384 (the study:
256), and no dropout inside the frozen encoder. `beauty637_study` and `controlled_study` run
phases 1 and 2; `beauty637_loop_study` and `loop_study` add the loop with the study's choices
(`loop.init="same"`, `loop.train_histories="human"`, `loop.click_epochs=3`; `feedback_loop.py`).

`mechanism` (`recsys/mechanism.py`) trains phase 1 with the study's settings for every encoder
over d in {0, 0.5, 1} and s in {0, 0.5} plus the identity-rewrite and from-scratch-tower
controls, seeds 0-4; `mechanism_smoke` is its test-sized version.

    python -m echo_jax.main --config=configs/source_bias.py:controlled --workdir=runs/bias
    python -m echo_jax.main --config=configs/source_bias.py:loop --workdir=runs/loop
    python -m echo_jax.main --config=configs/source_bias.py:mechanism --workdir=runs/mechanism
"""

import os

import ml_collections

from echo_jax.core.config import check_variant, load_config_file

VARIANTS = (
    "controlled",
    "beauty637",
    "beauty637_clean",
    "loop",
    "loop_small",
    "loop_smoke",
    "beauty637_loop",
    "beauty637_study",
    "beauty637_loop_study",
    "controlled_study",
    "loop_study",
    "mechanism",
    "mechanism_smoke",
)
ENCODERS = ("sasrec", "bert4rec", "gru4rec", "lrurec", "mean")


def get_config(variant: str = "controlled") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "source_bias")
    base = "beauty637" if variant.startswith("beauty637") else "controlled"
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
    # True: retrain at each rho on train and dev histories swapped alike (echo_jax's choice);
    # False: score dev, swapped at each rho, under the phase-1 model (the study's test.py)
    c.phases.retrain = True
    c.phases.seeds = (0,) if base == "controlled" else (0, 1, 2)
    if "loop" in variant:
        _add_loop(c, base)
    if variant == "loop_small":  # a few minutes: the notebook's default and the science test's
        _shrink(c, users=800, items=400, steps=40, phase_steps=60, iterations=5, seeds=(0, 1))
        c.phases.encoders = ("sasrec", "mean")
        c.phases.rhos = (0.0, 0.5, 1.0)
    if variant in ("beauty637_study", "beauty637_loop_study"):
        _study_settings(c, train_rows=594)  # the beauty637 train impressions (README)
    if variant == "beauty637_loop_study":  # its halves hold 772 and 283 impressions: 3 epochs
        c.loop.train_steps = -(-3 * (772 + 283) // 2 // c.train.batch_size)  # of their mean
        c.loop.init, c.loop.train_histories, c.loop.click_epochs = "same", "human", 3
    if variant in ("controlled_study", "loop_study"):
        _study_settings(c, train_rows=c.data.num_users)  # one train impression per user
    if variant == "loop_study":  # each half holds num_users / 2 impressions: 3 epochs of one
        c.loop.train_steps = -(-3 * c.data.num_users // 2 // c.train.batch_size)
        c.loop.init, c.loop.train_histories, c.loop.click_epochs = "same", "human", 3
    if variant.startswith("mechanism"):
        _mechanism(c, smoke=variant == "mechanism_smoke")
    if variant == "loop_smoke":  # every stage in seconds, for tests
        _shrink(c, users=300, items=150, steps=8, phase_steps=4, iterations=2, seeds=(0,))
        c.model.dim, c.train.batch_size = 16, 32
        c.phases.encoders, c.phases.rho_encoder, c.phases.rhos = ("mean",), "mean", (0.0, 1.0)
    return c


def _study_settings(c: ml_collections.ConfigDict, train_rows: int) -> None:
    m, t = c.model, c.train
    m.item_tower, m.item_projection, m.pooling, m.dim = "minilm", False, "padded_mean", 384
    t.negatives, t.batch_size, t.lr, t.weight_decay = 1, 256, 1e-3, 1e-5
    t.num_steps = -(-3 * train_rows // t.batch_size)  # 3 epochs
    t.checkpoint_every = t.num_steps
    c.phases.retrain = False
    c.phases.rhos = tuple(round(0.1 * i, 1) for i in range(11))


def _mechanism(c: ml_collections.ConfigDict, smoke: bool) -> None:
    """Phase 1 only, study settings, over the rewrite's d and s (`recsys/mechanism.py`)."""
    c.kind = "source_bias_mechanism"
    c.data.num_users, c.data.num_items = (300, 150) if smoke else (2000, 600)
    _study_settings(c, train_rows=c.data.num_users)
    del c.phases
    c.mechanism = ml_collections.ConfigDict()
    c.mechanism.denoise = (0.0, 1.0) if smoke else (0.0, 0.5, 1.0)
    c.mechanism.praise = (0.0,) if smoke else (0.0, 0.5)
    c.mechanism.encoders = ("mean", "sasrec") if smoke else ENCODERS
    c.mechanism.seeds = (0, 1, 2) if smoke else (0, 1, 2, 3, 4)
    # identity: AIGC copy = human copy (every score ties); scratch: the item tower trained from
    # scratch (150 steps, as `controlled`) instead of frozen MiniLM
    c.mechanism.controls = ("identity",) if smoke else ("identity", "scratch")


def _shrink(
    c: ml_collections.ConfigDict,
    users: int,
    items: int,
    steps: int,
    phase_steps: int,
    iterations: int,
    seeds: tuple[int, ...],
) -> None:
    c.data.num_users, c.data.num_items = users, items
    c.loop.train_steps, c.loop.iterations, c.loop.seeds = steps, iterations, seeds
    c.train.num_steps = phase_steps
    c.train.checkpoint_every = c.train.log_every = max(phase_steps // 2, 1)


def _add_loop(c: ml_collections.ConfigDict, base: str) -> None:
    c.kind = "source_bias_study"
    c.model.user_encoder = "bert4rec"  # the loop's recommender, as in the third-party rerun
    c.loop = ml_collections.ConfigDict()
    c.loop.with_phases = True  # run phases 1 and 2 first (into WORKDIR/phases)
    c.loop.iterations = 10  # loop iterations after the HGC-only start (iteration 0)
    c.loop.seeds = (0, 1, 2)
    c.loop.train_steps = 100 if base == "controlled" else 150  # per iteration, from scratch
    c.loop.click_eta = 0.0  # 0: click the better-ranked copy; > 0: position-biased clicks
    c.loop.init = "new"  # a new seed per iteration; "same": the same initial weights (the study)
    c.loop.train_histories = "swapped"  # or "human": train on unswapped histories (the study)
    c.loop.click_epochs = 1  # click draws per iteration's data (the study: 3, one per epoch)
    c.debias = ml_collections.ConfigDict()
    c.debias.alpha = 1.0  # the study's values; 0 and 0 run the undebiased loop only
    c.debias.beta = 0.01
    c.debias.rewrite_prob = 0.5  # history items rewritten for the perturbed user
