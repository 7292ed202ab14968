"""Config files: every variant builds; every mistake is one line on stderr with status 2."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from echo_jax.core.config import ConfigError, load_config, validate

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def _variants(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


@pytest.mark.parametrize(
    "path,variant",
    [(p, v) for p in CONFIG_FILES for v in _variants(p)],
    ids=lambda x: x.stem if isinstance(x, pathlib.Path) else x,
)
def test_every_variant_builds(path, variant):
    config = load_config(f"{path}:{variant}")
    assert "kind" in config
    assert "seed" in config or "sweeps" in config  # a grid's seeds are one of its axes
    if "train" in config:  # Expert Iteration's rounds have no step count of their own
        for key in ("num_steps", "log_every", "checkpoint_every"):
            assert config.train.get(key, 1) > 0
        assert "num_steps" in config.train or config.kind == "lm_ei"
        assert set(config.mesh.keys()) == {"data", "fsdp", "tensor"}


def test_overrides_are_typed():
    config = load_config(
        f"{REPO}/configs/lm_pretrain.py:tiny",
        ["train.num_steps=7", "train.lr=1", "data.levels=(1, 3)"],
    )
    assert config.train.num_steps == 7 and config.train.lr == 1.0
    assert config.data.levels == (1, 3)
    with pytest.raises(ConfigError, match="expects int"):
        load_config(f"{REPO}/configs/lm_pretrain.py:tiny", ["train.num_steps=1.5"])


def _main(*args, cwd=REPO, env=None):
    return subprocess.run(
        [sys.executable, "-m", "echo_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--config.train.num_stepz=3"],
            "unknown config key 'train.num_stepz' (did you mean 'train.num_steps'?)",
        ),
        (["--config.model.d_modle=64"], "did you mean 'model.d_model'?"),
        (["--config.train.num_steps=abc"], "--config.train.num_steps=abc"),
        (["--config.seed=-1"], "'seed' is -1; it must be an integer >= 0"),  # validate()
    ],
)
def test_cli_config_mistakes_are_one_line(tmp_path, args, expected):
    out = _main("--config=configs/lm_pretrain.py:tiny", f"--workdir={tmp_path}/w", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not (tmp_path / "w").exists()


def test_cli_verbose_adds_the_traceback_before_the_one_line(tmp_path):
    out = _main(
        "--config=configs/lm_pretrain.py:tiny",
        f"--workdir={tmp_path}/w",
        "--config.seed=-1",
        env={"ECHO_JAX_VERBOSE": "1"},
    )
    assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("echo_jax: error: config key 'seed'")


def test_cli_a_workdir_that_cannot_be_one_is_a_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("kept")  # the other cases: tests/core/test_workdir.py
    out = _main("--config=configs/lm_pretrain.py:tiny", f"--workdir={tmp_path / 'a_file'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"echo_jax: error: workdir {tmp_path / 'a_file'} exists and is not a directory"
    ]
    assert (tmp_path / "a_file").read_text() == "kept"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.batch_size=-4", "'train.batch_size' is -4; it must be an integer >= 1"),
        ("seed=-1", "'seed' is -1; it must be an integer >= 0"),
        ("train.lr=nan", "'train.lr' is nan; it must be a finite number"),
        ("train.lr=-0.1", "'train.lr' is -0.1; it must be >= 0"),
        ("train.num_steps=0", "'train.num_steps' is 0; it must be an integer >= 1"),
        ("train.checkpoint_every=0", "'train.checkpoint_every' is 0; it must be an integer >= 1"),
        ("data.examples_per_style=0", "'data.examples_per_style' is 0; it must be an integer >= 1"),
    ],
)
def test_values_no_run_can_use_are_refused(override, expected):
    validate(load_config(f"{REPO}/configs/lm_pretrain.py:tiny"))  # the preset itself is fine
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(load_config(f"{REPO}/configs/lm_pretrain.py:tiny", [override]))


def test_cli_unknown_variant_names_the_valid_ones(tmp_path):
    out = _main("--config=configs/lm_pretrain.py:huge", f"--workdir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "echo_jax: error: unknown variant 'huge' for configs/lm_pretrain.py; "
        "valid: tiny, small, base, 150m, 1b"
    ]


def _shape_checked(config):
    """(block, config) pairs whose train state `echo_jax.plan` can build by shape."""
    if config.kind == "echo_chamber":
        rl = config.rl.copy_and_resolve_references()
        rl.model = config.pretrain.model
        return [("pretrain", config.pretrain), ("rl", rl)]
    return [("", config)] if config.kind in ("lm_pretrain", "lm_rl") else []


@pytest.mark.parametrize(
    "path,variant",
    [(p, v) for p in CONFIG_FILES for v in _variants(p)],
    ids=lambda x: x.stem if isinstance(x, pathlib.Path) else x,
)
def test_every_variant_initialises_by_shape(path, variant):
    """`jax.eval_shape` of the init of every trainable variant, sharded on its own mesh (the 8
    fake devices cover the TPU variants' fsdp=8): shapes, dtypes and shardings, no allocation."""
    import jax

    from echo_jax import plan
    from echo_jax.core import sharding
    from echo_jax.core.train_loop import abstract_state

    blocks = _shape_checked(load_config(f"{path}:{variant}"))
    if not blocks:
        pytest.skip(
            "no train state of its own (evaluation, or the recommender's data-built "
            "tables: covered by tests/recsys)"
        )
    for name, config in blocks:
        mesh = sharding.config_mesh(config.mesh.to_dict())
        task, _, _ = plan.task_for(config, mesh)
        state = abstract_state(task, mesh, config.sharding.rules, jax.random.key(0))
        leaves = jax.tree.leaves(state.params)
        assert leaves and all(x.sharding is not None for x in leaves), name
        per_device, total = (
            plan.bytes_per_device(state.params),
            sum(x.size * x.dtype.itemsize for x in leaves),
        )
        assert plan.bytes_per_device(state) > per_device > 0
        model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
        assert total / model_shards <= per_device <= total
        assert (per_device < total) == (model_shards > 1), name  # sharded exactly when it can be
