"""The `recsys_train` job (one training run) and what every recommender job builds from its
config: the dataset and its feature table, the model, and the `TrainTask` of the shared loop."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from echo_jax.core import plots, rng, sharding
from echo_jax.core.config import ConfigError
from echo_jax.core.train_loop import LoopConfig, TrainTask, train
from echo_jax.recsys import calibrated, catalogue, data
from echo_jax.recsys import train as rtrain
from echo_jax.recsys.debias import Debias, rewrite_rows
from echo_jax.recsys.item_cache import minilm_vectors
from echo_jax.recsys.model import ModelConfig, Recommender
from echo_jax.recsys.pipeline import (
    TextRows,
    encode_impressions,
    make_train_iterator,
    positive_log_q,
)
from echo_jax.recsys.text_encoder import POOLINGS, WordVocab, minilm_dir

DATASETS = ("controlled", "beauty637")


CATALOGUES = ("calibrated", "templated")


def _controlled(data_cfg: ml_collections.ConfigDict) -> data.RecDataset:
    """The synthetic catalogue `data.catalogue` names (`calibrated` or the older `templated`)."""
    shared = dict(
        seed=data_cfg.catalogue_seed,
        num_users=data_cfg.num_users,
        num_items=data_cfg.num_items,
        num_topics=data_cfg.num_topics,
        history_len=data_cfg.history_len,
    )
    if data_cfg.catalogue == "calibrated":
        return calibrated.make_calibrated_catalogue(
            **shared,
            rewrite=dataclasses.replace(
                calibrated.Rewrite(), denoise=data_cfg.denoise, praise=data_cfg.praise
            ),
            rewriter=data_cfg.rewriter,
        )
    if data_cfg.catalogue == "templated":
        return catalogue.make_controlled_catalogue(
            **shared, rewrite_strength=data_cfg.rewrite_strength
        )
    raise ConfigError(f"data.catalogue {data_cfg.catalogue!r} not in {CATALOGUES}")


def load_dataset(
    data_cfg: ml_collections.ConfigDict, with_rewrite: bool = False
) -> tuple[data.RecDataset, TextRows]:
    """The dataset and its text rows: `(hgc, aigc)` sources, every item in both, plus the
    rewrite of the AIGC text (the debiaser's third source) when `with_rewrite`."""
    if data_cfg.name == "controlled":
        ds = _controlled(data_cfg)
        aigc = data_cfg.aigc_source or catalogue.SIM_LLM
        rewrite = data_cfg.rewrite_source or catalogue.SIM_LLM_REWRITE
    elif data_cfg.name == "beauty637":
        ds = data.build_beauty637(seed=data_cfg.catalogue_seed, clean=data_cfg.clean)
        aigc = data_cfg.aigc_source or data.MISTRAL
        rewrite = data_cfg.rewrite_source or data.REWRITE_SOURCE
    else:
        raise ConfigError(f"data.name {data_cfg.name!r} not in {DATASETS}")
    if aigc not in ds.texts:
        raise ConfigError(f"data.aigc_source {aigc!r} not in {sorted(ds.texts)}")
    if not with_rewrite:
        return ds, TextRows(tuple(ds.items), (data.HGC, aigc))
    if rewrite not in ds.texts:
        raise ConfigError(
            f"data.rewrite_source {rewrite!r} not in {sorted(ds.texts)} (the "
            f"feedback loop loads it for both arms, the undebiased one included)"
        )
    missing = set(ds.items) - set(ds.texts[rewrite])
    if missing:
        raise ConfigError(
            f"data.rewrite_source {rewrite!r} has no text for {len(missing)} "
            f"items (e.g. {sorted(missing)[0]!r})"
        )
    return ds, TextRows(tuple(ds.items), (data.HGC, aigc, rewrite))


def feature_table(
    config: ml_collections.ConfigDict, ds: data.RecDataset, rows: TextRows, cache_dir: str
) -> tuple[np.ndarray, int]:
    """`[R, F]` item features and the vocabulary size (0 for frozen vectors)."""
    texts = rows.texts(ds)
    if config.model.item_tower == "minilm":
        if config.model.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling {config.model.pooling!r} not in {POOLINGS}")
        model_dir = str(minilm_dir(config.model.minilm_dir))
        # cached per source: runs that differ in one source (the rewrite) share the others'
        n = len(rows.items)
        pooling = config.model.pooling
        table = np.concatenate(
            [
                minilm_vectors(texts[k : k + n], model_dir, cache_dir, pooling)
                for k in range(0, len(texts), n)
            ]
        )
        if not config.model.item_projection and config.model.dim != table.shape[1]:
            raise ConfigError(
                f"model.item_projection=False scores dot(user, item vector): model.dim must be "
                f"the item vectors' width {table.shape[1]}, got {config.model.dim}"
            )
        return table, 0
    vocab = WordVocab.build(texts)
    return vocab.encode(texts, config.model.max_text_len)[0], len(vocab)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in config.model.items() if k in names}
    try:
        return ModelConfig(**fields, vocab_size=vocab_size, history_len=config.data.history_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Prepared:
    """Everything a run derives from its config before training: rows, features, arrays."""

    rows: TextRows
    texts: list[str]
    table: np.ndarray  # [R, F] item features
    model: Recommender
    train_arrays: dict[str, np.ndarray]
    eval_arrays: dict[str, np.ndarray]


def prepare(
    config: ml_collections.ConfigDict, cache_dir: str, eval_aigc_share: float | None = None
) -> Prepared:
    """`eval_aigc_share` swaps the dev histories at another share than training's (the study's
    phase 2, which scores dev under the phase-1 model)."""
    ds, rows = load_dataset(config.data)
    table, vocab_size = feature_table(config, ds, rows, cache_dir)
    d = config.data
    return Prepared(
        rows=rows,
        texts=rows.texts(ds),
        table=table,
        model=Recommender(model_config(config, vocab_size)),
        train_arrays=encode_impressions(
            ds.splits[d.train_split],
            rows,
            d.history_len,
            d.aigc_share,
            swap_seed=config.seed + rng.TRAIN_SWAP,
        ),
        eval_arrays=encode_impressions(
            ds.splits[d.eval_split],
            rows,
            d.history_len,
            d.aigc_share if eval_aigc_share is None else eval_aigc_share,
            swap_seed=config.seed + rng.EVAL_SWAP,
        ),
    )


def build_task(
    config: ml_collections.ConfigDict, mesh, prep: Prepared
) -> tuple[TrainTask, Callable]:
    """The shared loop's task (without evaluation) and `evaluate(state)` on the dev split."""
    d, t = config.data, config.train
    if t.batch_size % (sharding.batch_divisor(mesh) * jax.process_count()):
        raise ConfigError(
            f"train.batch_size {t.batch_size} is not divisible by the "
            f"{sharding.batch_divisor(mesh)} data x fsdp shards of the mesh"
        )
    tx = rtrain.make_optimizer(t.lr, t.weight_decay)
    num_items = len(prep.rows.items)
    num_candidates = prep.train_arrays["candidates"].shape[1]
    log_q = positive_log_q(prep.train_arrays["positive_item"], num_items)
    try:
        debias = Debias.from_config(config.get("debias"))
        rewrite = rewrite_rows(num_items, len(prep.rows.sources)) if debias.enabled else None
        if not 0 <= t.negatives < num_candidates:
            raise ValueError(
                f"train.negatives must be in [0, {num_candidates - 1}] (0: all shown), "
                f"got {t.negatives}"
            )
        step = rtrain.make_train_step(
            prep.model, tx, prep.table, t.loss, log_q, debias, rewrite, t.negatives
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    task = TrainTask(
        init_state=rtrain.make_init_state(
            prep.model, tx, prep.table, d.history_len, num_candidates
        ),
        train_step=step,
        train_iter=make_train_iterator(
            prep.train_arrays,
            t.batch_size // jax.process_count(),
            config.seed,
            jax.process_index(),
            jax.process_count(),
        ),
        meta={
            "model": {
                **dataclasses.asdict(prep.model.cfg),
                "data": d.to_dict(),
                "loss": t.loss,
                "negatives": t.negatives,
                "debias": dataclasses.asdict(debias),
            }
        },
        tokens_per_step=t.batch_size,  # examples per step
    )
    scorer = rtrain.Scorer(prep.model, prep.table)
    return task, rtrain.make_evaluate(scorer, prep.eval_arrays, num_items)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    cache_dir: str,
    evaluate_in_loop: bool = True,
    label: str = "recsys",
    eval_aigc_share: float | None = None,
    score_config: ml_collections.ConfigDict | None = None,
) -> dict[str, float]:
    """One training run through the shared loop (resumed if `workdir` has checkpoints, returned
    at once if finished); returns the final evaluation (of dev histories swapped at
    `eval_aigc_share` when given; on `score_config`'s data when given: the same model scoring
    other item texts, as the mechanism job's cells do)."""
    mesh = sharding.make_mesh(config.mesh.to_dict())
    task, evaluate = build_task(config, mesh, prepare(config, cache_dir, eval_aigc_share))
    if evaluate_in_loop:
        task.evaluate = evaluate
    state = train(
        task,
        LoopConfig.from_config(config.train),
        mesh,
        config.sharding.rules,
        workdir,
        config.seed,
        config=config,
        label=label,
    )
    if score_config is not None:
        prep = prepare(score_config, cache_dir, eval_aigc_share)
        _, evaluate = build_task(score_config, mesh, prep)
    return evaluate(state)


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """The `recsys_train` kind: train, evaluate, plot the curves."""
    cache_dir = config.model.cache_dir or os.path.join(workdir, "item_cache")
    result = train_and_evaluate(config, workdir, cache_dir, evaluate_in_loop=True)
    if jax.process_index() == 0:
        plots.plot_curves(workdir, ["train/loss"], "train_loss.png", "training loss")
        plots.plot_curves(workdir, ["eval/ndcg@", "eval/full/"], "eval.png", "dev ranking")
        plots.plot_curves(
            workdir,
            ["bias/llm_ratio", "bias/rela_delta/ndcg@"],
            "source_bias.png",
            "source bias on paired lists",
        )
    return result
