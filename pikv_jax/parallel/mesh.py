"""Device meshes for data and expert parallelism, and version-stable access to `shard_map`.

Meshes are built with explicit `Auto` axis types: `jax.make_mesh` otherwise defaults to Explicit
axes on recent jax, under which `shard_map` rejects inputs that were not placed on the mesh. Mesh
shapes are passed positionally (the keyword was renamed between jax versions).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
EXPERT_AXIS = "expert"


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = False):
    """`jax.shard_map` (jax >= 0.6), falling back to `jax.experimental.shard_map.shard_map`."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old jax

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = (DATA_AXIS, EXPERT_AXIS), *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all devices, every process) with Auto axes.

    Raises ValueError when the device count does not match prod(shape).
    """
    shape = tuple(int(s) for s in shape)
    names = tuple(axis_names)
    if len(shape) != len(names):
        raise ValueError(f"mesh shape {shape} and axis_names {names} differ in length")
    if any(s < 1 for s in shape):
        raise ValueError(f"mesh shape entries must be >= 1, got {shape}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {len(devices)} available "
                         "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    axis_types = None
    if hasattr(jax.sharding, "AxisType"):
        axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
    try:
        return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)
    except TypeError:  # pragma: no cover - jax without axis_types / devices keywords
        return Mesh(np.asarray(devices).reshape(shape), names)


def expert_mesh(num_data: int, num_expert: int, devices=None) -> Mesh:
    """The ("data", "expert") mesh used by `DistributedPiKVMoE`."""
    return make_mesh((num_data, num_expert), (DATA_AXIS, EXPERT_AXIS), devices=devices)


def named(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*spec))


__all__ = ["DATA_AXIS", "EXPERT_AXIS", "expert_mesh", "make_mesh", "named", "shard_map"]
