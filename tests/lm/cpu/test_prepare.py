"""`cpu.prepare` builds the kernels only where the model may run one, and the kernel switches
reach the model from the command line."""

import dataclasses

import jax
import numpy as np
import pytest

from echo_jax.core.config import load_config
from echo_jax.lm import cpu, pretrain
from echo_jax.lm.cpu import build
from echo_jax.lm.model import ModelConfig
from tests.conftest import REPO
from tests.lm.cpu.model_checks import with_choices


def test_prepare_builds_only_where_a_kernel_may_run(monkeypatch):
    calls = []
    monkeypatch.setattr(build, "require", lambda: calls.append("require"))
    monkeypatch.setattr(build, "available", lambda: calls.append("available") or True)
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, mlp_dim=8, max_len=8)
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    four_devices = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))

    def built(cfg, mesh=None) -> list[str]:
        calls.clear()
        cpu.prepare(cfg, mesh)
        return list(calls)

    assert built(cfg, one_device) == ["available"]  # "auto": a failed build falls back
    assert built(cfg, four_devices) == []
    assert built(cfg) == []  # no mesh: the tests' 8 devices
    xla_cfg = dataclasses.replace(cfg, kernels="xla")
    assert built(xla_cfg, one_device) == []
    assert built(with_choices(xla_cfg, dense_vjps="cpu"), one_device) == []  # no C++ in it
    assert built(with_choices(xla_cfg, rms_norm="auto"), one_device) == ["available"]
    assert built(with_choices(xla_cfg, attention="cpu"), four_devices) == ["require"]


@pytest.mark.parametrize(
    "overrides,kernels,kernel_overrides",
    [
        ((), "auto", ()),
        (("model.kernels=xla",), "xla", ()),
        (
            ("model.kernel_overrides=(('attention', 'xla'), ('swiglu', 'cpu'))",),
            "auto",
            (("attention", "xla"), ("swiglu", "cpu")),
        ),
    ],
)
def test_switches_from_the_command_line(overrides, kernels, kernel_overrides):
    config = load_config(str(REPO / "configs/lm_pretrain.py:tiny"), overrides)
    cfg = pretrain.model_config(config)
    assert (cfg.kernels, cfg.kernel_overrides) == (kernels, kernel_overrides)
    hash(cfg)  # a Flax module attribute
