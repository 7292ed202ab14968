"""The study's experiment grid in one command (STUDIES.md A): pretraining mixture x model size x
RL algorithm x KL coefficient x seed, then one report (`echo_jax/lm/jobs/grid.py`).

    python -m echo_jax.main --config=configs/echo_grid.py:cpu --workdir=runs/grid \
        [--config.grid.shard=0 --config.grid.num_shards=2]

A grid is the union of named sweeps (`sweeps.<name>`, each a product of its axes, as the
study's sweep files list theirs). A cell's RL block is `rl` with its algorithm's own settings
(`algorithms.<algo>`: what `lm_rl.py:<algo>` sets differently from `lm_rl.py:grpo`, e.g. the KL
estimator) and its KL coefficient. A cell is one RL run (and its evaluation) from one pretraining
run; a pretraining run (mixture, size, seed) and its evaluation before RL are shared by every cell
that starts from it. A rerun skips finished cells and resumes a cut one; `grid.num_shards`
processes on one workdir (or TPU VMs on one bucket) each take `grid.shard`'s share, whole
pretraining groups at a time (a group's shard is a hash of its name, so adding sweeps moves no
group); `grid.report_only=True` rebuilds the report from what is finished.

Variants: `smoke` (every stage in seconds: tests and the notebook), `cpu` (the claims at small
scale on 2 CPU cores), `study_150m` and `study_1b` (the study's grid, for TPUs).
"""

import os

import ml_collections

from echo_jax.core.config import check_variant, load_config_file, resume_options

VARIANTS = ("smoke", "cpu", "study_150m", "study_1b")
# d_model, n_layers, n_heads, mlp_dim, peak lr: the CPU ladder, 0.2M, 1.2M and 6.6M parameters
# (counted from the shapes; 30x apart)
CPU_SIZES = {
    "xs": (64, 2, 2, 256, 3e-3),
    "tiny": (128, 4, 4, 512, 3e-3),
    "small": (256, 6, 8, 1024, 2e-3),
}
STUDY_SIZES = {"150m": (768, 12, 12, 3072, 1e-3), "1b": (2048, 16, 16, 8192, 1e-3)}


def _family(spec: str) -> ml_collections.ConfigDict:
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), spec))
    del config["resume"]  # the grid's one `resume` block is every stage's
    return config


def _sweep(mixtures, sizes, algos, kl_coefs, seeds) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "mixtures": tuple(mixtures),
            "sizes": tuple(sizes),
            "algos": tuple(algos),
            "kl_coefs": tuple(float(k) for k in kl_coefs),
            "seeds": tuple(seeds),
        }
    )


def _sizes(table: dict) -> ml_collections.ConfigDict:
    keys = ("d_model", "n_layers", "n_heads", "mlp_dim", "lr")
    return ml_collections.ConfigDict({n: dict(zip(keys, v, strict=True)) for n, v in table.items()})


ALGORITHMS = ("grpo", "ppo", "reinforce", "rloo", "ei_online")


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _algorithm_settings() -> ml_collections.ConfigDict:
    """Per algorithm, the `lm_rl.py` keys its own variant sets differently from GRPO's."""
    base = _flat(_family("lm_rl.py:grpo"))
    out = ml_collections.ConfigDict()
    for algo in ALGORITHMS:
        own = ml_collections.ConfigDict()
        for path, value in _flat(_family(f"lm_rl.py:{algo}")).items():
            if path != "algo" and base.get(path) != value:
                block, key = path.rsplit(".", 1)
                if block not in own:
                    own[block] = ml_collections.ConfigDict()
                own[block][key] = value
        out[algo] = own
    return out


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    variant = check_variant(variant, VARIANTS, "echo_grid")
    study = variant.startswith("study_")
    c = ml_collections.ConfigDict()
    c.kind = "echo_grid"
    c.variant = variant
    c.grid = ml_collections.ConfigDict()
    c.grid.shard = 0  # this process's share of the cells: pretraining groups shard % num_shards
    c.grid.num_shards = 1
    c.grid.report_only = False  # only (re)build the report from the finished cells
    c.grid.share_threshold = 0.9  # "collapsed": the dominant style's rollout share passes this
    c.sweeps = ml_collections.ConfigDict()
    scale = variant.removeprefix("study_")
    c.sizes = _sizes(STUDY_SIZES if study else CPU_SIZES)
    if study:
        c.pretrain = _family(f"lm_pretrain.py:{scale}")
        c.rl = _family("lm_rl.py:study_grpo")
        c.eval = _family("lm_eval.py:gsm8k")
    else:  # each cell's stages as the main job runs them (its `smoke` for the smoke grid)
        main_job = _family(f"echo_chamber.py:{'smoke' if variant == 'smoke' else 'tiny'}")
        c.pretrain, c.rl, c.eval = main_job.pretrain, main_job.rl, main_job.eval
    # other problems each cell's model is evaluated on before and after RL (an lm_eval config
    # each): the study's benchmarks at its scale, a harder synthetic level in the smoke grid
    c.transfer = ml_collections.ConfigDict()
    if study:
        for benchmark in ("math500", "aime_all"):
            c.transfer[benchmark] = _family(f"lm_eval.py:{benchmark}")
    c.algorithms = _algorithm_settings()
    if variant == "smoke":
        _smoke(c)
    elif variant == "cpu":
        _cpu(c)
    else:
        _study(c, scale)
    c.resume = resume_options()
    return c


def _cpu(c: ml_collections.ConfigDict) -> None:
    """The claims at small scale: scale (A3: the 0.2M, 1.2M and 6.6M rungs, a second seed where
    pretraining is cheap), algorithm x KL (A1, A2, A4: 3 policy-gradient algorithms x 3
    coefficients, and online EI, which has no KL term), mixture (A5: 4 TinyGSM shares); 8
    pretraining runs and 17 cells. Measured: 16 cells in 92 min with 2-4 shard processes on 2
    busy cores, the 6.6M cell's pretraining at 1.3-1.4 steps/s alone (RESULTS). Add
    seeds to a sweep (`--config.sweeps.algorithm_kl.seeds=0,1`); finished cells are kept."""
    main, tiny = ["tg_omi1_omi2"], ["tiny"]
    c.sweeps.scale = _sweep(main, ["xs", "tiny", "small"], ["grpo"], [0], [0])
    c.sweeps.scale_seeds = _sweep(main, ["xs", "tiny"], ["grpo"], [0], [1])
    c.sweeps.algorithm_kl = _sweep(main, tiny, ["grpo", "ppo", "reinforce"], [0, 1e-3, 1e-2], [0])
    c.sweeps.expert_iteration = _sweep(main, tiny, ["ei_online"], [0], [0])
    c.sweeps.mixture = _sweep(["tg", "tg_omi1", "tg_4xomi1", *main], tiny, ["grpo"], [0], [0])


def _study(c: ml_collections.ConfigDict, scale: str) -> None:
    """The study's mixtures at its scale (STUDIES.md A), its three estimators and KL grid."""
    mixtures = (
        ["tg", "tg_omi1", "tg_2xomi1", "tg_4xomi1", "tg_8xomi1", "tg_omi2", "tg_omi1_omi2"]
        if scale == "150m"
        else ["tg", "tg_4xomi1", "tg_omi2", "tg_omi1_omi2"]
    )
    c.sweeps.study = _sweep(mixtures, [scale], ["ppo", "grpo", "reinforce"], [0, 1e-3, 1e-2], [0])


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Two sizes, two algorithms, two mixtures, a transfer level: every stage and every report
    part in seconds."""
    c.transfer.level3 = c.eval.copy_and_resolve_references()
    c.transfer.level3.synthetic.levels = (3,)
    c.sizes = _sizes({"s1": (16, 1, 2, 32, 3e-3), "s2": (32, 1, 2, 64, 3e-3)})
    c.sweeps.scale = _sweep(["tg_omi1_omi2"], ["s1", "s2"], ["grpo"], [0], [0])
    c.sweeps.algorithm_kl = _sweep(["tg_omi1_omi2"], ["s1"], ["grpo", "ppo"], [0, 1e-2], [0])
    c.sweeps.mixture = _sweep(["tg_omi1"], ["s1"], ["grpo"], [0], [0])
