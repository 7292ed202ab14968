"""The `lm_pretrain` job: next-token pretraining on the style mixture through the shared loop."""

from __future__ import annotations

import jax
import ml_collections

from echo_jax.core import plots, sharding
from echo_jax.core.config import ConfigError
from echo_jax.core.train_loop import LoopConfig, TrainTask, train
from echo_jax.lm import cpu, pretrain
from echo_jax.lm.data import mixtures, pipeline, vocab
from echo_jax.lm.model import Transformer, config_meta


def build_pretrain_task(config: ml_collections.ConfigDict, mesh) -> TrainTask:
    """Model, optimizer, grain iterator and per-style evaluation for `configs/lm_pretrain.py`."""
    cfg = pretrain.model_config(config)
    if config.data.source not in pipeline.SOURCES:
        raise ConfigError(
            f"data.source must be one of {pipeline.SOURCES}, got {config.data.source!r}"
        )
    vocab_size = vocab.get_vocabulary(config.data.vocab).vocab_size
    if cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.vocab_size} < vocabulary size {vocab_size} "
            f"of data.vocab={config.data.vocab!r}"
        )
    global_batch = config.train.batch_size
    if global_batch % sharding.batch_divisor(mesh):
        raise ConfigError(
            f"train.batch_size {global_batch} is not divisible by the "
            f"{sharding.batch_divisor(mesh)} data x fsdp shards of the mesh"
        )
    cpu.prepare(cfg, mesh)
    model, tx = Transformer(cfg), pretrain.make_optimizer(config.train)
    data = config.data
    train_iter = pipeline.make_train_iterator(
        mixture=data.mixture,
        seed=config.seed,
        seq_len=data.seq_len,
        batch_size=global_batch // jax.process_count(),
        levels=data.levels,
        loss_on=data.loss_on,
        vocab_name=data.vocab,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        examples_per_style=data.examples_per_style,
        omi1_print_share=data.omi1_print_share,
        source=data.source,
        real_dir=data.real_dir,
        real_skip=data.eval_examples,
    )
    eval_batches = {
        style: pipeline.make_eval_batches(
            style=style,
            split="validation",
            seed=config.seed,
            num_examples=data.eval_examples,
            seq_len=data.seq_len,
            batch_size=global_batch,
            levels=data.levels,
            loss_on=data.loss_on,
            vocab_name=data.vocab,
            omi1_print_share=data.omi1_print_share,
            source=data.source,
            real_dir=data.real_dir,
        )
        for style in mixtures.get_mixture(data.mixture)
    }
    return TrainTask(
        init_state=pretrain.make_init_state(model, tx, data.seq_len),
        train_step=pretrain.make_train_step(model, tx),
        train_iter=train_iter,
        evaluate=pretrain.make_eval_fn(model, eval_batches),
        meta=config_meta(cfg),
        tokens_per_step=global_batch * data.seq_len,
    )


def run_pretrain(config: ml_collections.ConfigDict, workdir: str):
    mesh = sharding.make_mesh(config.mesh.to_dict())
    task = build_pretrain_task(config, mesh)
    state = train(
        task,
        LoopConfig.from_config(config.train),
        mesh,
        config.sharding.rules,
        workdir,
        config.seed,
        config=config,
        label="pretrain",
    )
    if jax.process_index() == 0:
        plots.plot_curves(
            workdir,
            ["train/loss", "val/loss/"],
            "pretrain_loss.png",
            "pretraining loss (per style on validation)",
        )
    return state
