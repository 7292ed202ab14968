"""The `source_bias_mechanism` job: phase 1 over the calibrated catalogue's rewrite settings and
its controls (`recsys/mechanism.py`), resumable.

Each (cell, encoder, seed) sub-run leaves a `result.json` in `WORKDIR/runs/<name>`; finished
sub-runs are skipped. Seed s draws catalogue s and trains with seed s. Phase 1 trains on human
text only, so cells that change only the AIGC text (`data.*`: d, s, the identity rewrite) share
one model per (encoder, seed): the first such cell trains it, the others score their own AIGC
copies under it (their folders hold only `result.json`). Human texts, clicks and vectors are
shared too (cached per source in `WORKDIR/item_cache`). Writes `report.md`, `results.json` and
`plots/mechanism.png`.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections

from echo_jax.core import workdir as workdir_lib
from echo_jax.core.config import ConfigError
from echo_jax.core.files import write_json
from echo_jax.recsys import mechanism
from echo_jax.recsys.calibrated import REWRITERS
from echo_jax.recsys.jobs.phases import run_sub_runs, start_sub_runs
from echo_jax.recsys.jobs.train import train_and_evaluate
from echo_jax.recsys.model import USER_ENCODERS
from echo_jax.recsys.text_encoder import minilm_dir

GRID_MAY_CHANGE = (
    *workdir_lib.RESUME_MAY_CHANGE,
    "mechanism.denoise",
    "mechanism.praise",
    "mechanism.encoders",
    "mechanism.seeds",
    "mechanism.controls",
)


def sub_config(
    config: ml_collections.ConfigDict, overrides: dict, encoder: str, seed: int
) -> ml_collections.ConfigDict:
    """The `recsys_train` config of one sub-run."""
    sub = ml_collections.ConfigDict(config.to_dict())
    del sub["mechanism"]
    sub.kind = "recsys_train"
    sub.seed = sub.data.catalogue_seed = seed
    sub.model.user_encoder = encoder
    for key, value in overrides.items():
        section, name = key.split(".")
        sub[section][name] = value
    return sub


def _text_only(overrides: dict) -> bool:
    """A cell that changes only the data (the AIGC text), not the model or its training."""
    return all(key.startswith("data.") for key in overrides)


def check(config: ml_collections.ConfigDict) -> None:
    mech = config.mechanism
    unknown = set(mech.controls) - set(mechanism.CONTROLS)
    if unknown:
        raise ConfigError(f"mechanism.controls {sorted(unknown)} not in {list(mechanism.CONTROLS)}")
    if config.data.name != "controlled" or config.data.catalogue != "calibrated":
        raise ConfigError("the mechanism job needs data.name=controlled, data.catalogue=calibrated")
    unknown = set(mech.encoders) - set(USER_ENCODERS)
    if unknown:
        raise ConfigError(f"mechanism.encoders {sorted(unknown)} not in {USER_ENCODERS}")
    if config.data.rewriter not in REWRITERS:
        raise ConfigError(f"data.rewriter {config.data.rewriter!r} not in {REWRITERS}")
    minilm_dir(config.model.minilm_dir)  # one line naming the pip command when missing


def _shares_models(config: ml_collections.ConfigDict) -> bool:
    """Cells that change only the AIGC text can share a model when training never reads it:
    human training histories, and frozen vectors (a trained tower's vocabulary spans both
    copies)."""
    return config.data.aigc_share == 0 and config.model.item_tower == "minilm"


def run_mechanism(config: ml_collections.ConfigDict, workdir: str) -> dict:
    check(config)
    cache_dir = start_sub_runs(config, workdir, "mechanism", GRID_MAY_CHANGE)
    mech = config.mechanism
    cells = mechanism.cells(mech)
    shared = [c for c, o in cells.items() if _text_only(o) and _shares_models(config)]
    trains = {}
    for seed in mech.seeds:
        for cell, overrides in cells.items():
            for encoder in mech.encoders:
                # the first shared cell trains the model the other text-only cells score with
                trained_at = shared[0] if cell in shared else cell
                name = mechanism.run_name(cell, encoder, seed)
                trains[name] = functools.partial(
                    train_and_evaluate,
                    sub_config(config, cells[trained_at], encoder, seed),
                    os.path.join(workdir, "runs", mechanism.run_name(trained_at, encoder, seed)),
                    cache_dir,
                    evaluate_in_loop=False,
                    label=name,
                    score_config=None
                    if trained_at == cell
                    else sub_config(config, overrides, encoder, seed),
                )
    results = run_sub_runs(workdir, "mechanism", trains)
    summary = mechanism.summarise(mech, results)
    write_json(os.path.join(workdir, "results.json"), summary)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write("# Source-bias mechanism\n\n" + mechanism.markdown(summary))
            f.write("\n![mechanism](plots/mechanism.png)\n")
        mechanism.plot(summary, os.path.join(workdir, "plots", "mechanism.png"))
    return summary
