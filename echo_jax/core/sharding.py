"""Device mesh, logical-axis rules and batch sharding.

Models annotate parameters and activations with *logical* axis names ("embed", "mlp", "heads",
"batch", ...). The config maps them onto the three mesh axes by a short rule list, so one model
runs data-parallel, FSDP or tensor-parallel by changing the config only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from echo_jax.core.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves axis sizes (one may be -1 = "all remaining devices") to a concrete shape."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh: axis sizes {dict(zip(MESH_AXES, shape))} need {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """An Auto-axes mesh over all devices (or `devices`) with axes data x fsdp x tensor."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def config_mesh(sizes: dict[str, int]) -> Mesh:
    """The mesh of a config's `mesh` block over the first devices it needs (all of them when an
    axis is -1); too few devices is a ConfigError that says how to fake them on a CPU."""
    devices = jax.devices()
    needed = math.prod(int(v) for v in sizes.values())
    if -1 not in sizes.values() and needed > len(devices):
        raise ConfigError(
            f"mesh {dict(sizes)} needs {needed} devices, {len(devices)} available (on a CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} fakes them)"
        )
    return make_mesh(sizes, devices if -1 in sizes.values() else devices[:needed])


def logical_to_sharding(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a tree holding `nn.LogicallyPartitioned` leaves (e.g. an `eval_shape` of an init) to
    NamedShardings; leaves without annotations are replicated."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of a batch into global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
