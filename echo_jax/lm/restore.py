"""Loading a trained model from a pretraining (or later) workdir, for evaluation and RL.

A workdir holds `config.json` and `checkpoints/<step>/{state,meta,data}` written by
`echo_jax.core.checkpoint.Checkpointer`; `meta.model` is the `ModelConfig`. Only the parameters
are read (an Orbax partial restore), so neither the optimizer nor its config is needed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from echo_jax.core import stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.checkpoint import Checkpointer, one_line
from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.core.stages import checkpoint_dir
from echo_jax.lm.model import ModelConfig, Transformer

# the runs whose checkpoints hold a language model (hf_import: `echo_jax.lm.hf import`)
LM_KINDS = ("lm_pretrain", "lm_rl", "lm_ei", "hf_import")


def _run_config(path: pathlib.Path) -> dict:
    """The config a run runs with now (`config.json`, or its newest resume's: see
    `core.workdir.effective_config`); `ConfigError` when it is not a language model's run."""
    config = workdir_lib.effective_config(path.parent)
    if config.get("kind") not in LM_KINDS:
        raise ConfigError(
            f"{path.parent} holds a {config.get('kind')!r} run, not a language model "
            f"(one of {', '.join(LM_KINDS)})"
        )
    return config


def vocab_name(workdir: str) -> str:
    """The `data.vocab` the model in `workdir` was trained with, from the run's `config.json`
    (next to its checkpoints/). Without it the token ids cannot be read, so MissingFileError."""
    for folder in (pathlib.Path(workdir).resolve(), checkpoint_dir(workdir).parent):
        path = folder / "config.json"
        if path.is_file():
            vocab = _run_config(path).get("data", {}).get("vocab")
            if vocab is None:
                raise MissingFileError(
                    f"{path} has no data.vocab: the vocabulary of the checkpoint is unknown"
                )
            return vocab
    raise MissingFileError(
        f"no config.json in {pathlib.Path(workdir).resolve()} or next to "
        f"{checkpoint_dir(workdir)}: the checkpoint's vocabulary is unknown"
    )


def latest_step(workdir: str) -> int:
    """The newest checkpointed step of `workdir`; MissingFileError naming the folder if none."""
    step = stages.latest_step(workdir)
    if step is None:
        raise MissingFileError(f"no checkpoint found in {checkpoint_dir(workdir)}")
    return step


def _from_meta(fields: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's meta describes. Checkpoints written before the CPU choices
    became `kernels` (RL's, up to session 6) also hold `attention_kernel`, `dense_grads`,
    `norm_kernel` and `mlp_kernel`, which choose how a step runs: dropped."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def model_config(workdir: str, step: int | None = None) -> ModelConfig:
    """The model config of the latest checkpoint (or `step`) of `workdir`, from its metadata."""
    vocab_name(workdir)  # the workdir must be a language model's run
    step = latest_step(workdir) if step is None else step
    ckpt = Checkpointer(str(checkpoint_dir(workdir)), async_save=False)
    try:
        return _from_meta(ckpt.read_meta(step)["model"])
    except (KeyError, TypeError, OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"cannot read the model of step {step} in {ckpt.directory} ({one_line(e)})"
        ) from None
    finally:
        ckpt.close()


def load_params(
    workdir: str, step: int | None = None, mesh: Mesh | None = None, shardings: Any = None
) -> tuple[ModelConfig, Any]:
    """(model config, params) from the latest checkpoint (or `step`) of `workdir`.

    Params are placed by `shardings` (a tree like the params, e.g. a sharded state's), else
    replicated over `mesh` (on the first device without one). Raises MissingFileError naming the
    folder when it holds no such checkpoint.
    """
    step = latest_step(workdir) if step is None else step
    if not checkpoint_dir(workdir).is_dir():  # the manager would create a mistyped folder
        raise MissingFileError(f"no checkpoint found in {checkpoint_dir(workdir)}")
    ckpt = Checkpointer(str(checkpoint_dir(workdir)), async_save=False)
    try:
        if step not in ckpt.manager.all_steps():
            raise MissingFileError(f"no checkpoint for step {step} in {ckpt.directory}")
        cfg = _from_meta(ckpt.read_meta(step)["model"])
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)
        where = (
            NamedSharding(mesh, P()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        )
        abstract = nn.meta.unbox(shapes["params"])
        if shardings is None:
            shardings = jax.tree.map(lambda _: where, abstract)
        target = {
            "params": jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
            )
        }
        restored = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    finally:
        ckpt.close()
    return cfg, restored["state"]["params"]
