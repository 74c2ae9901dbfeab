"""Device meshes for data, model (tensor), expert and sequence (cache slot) parallelism, and a
version-stable `shard_map`.

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

DATA_AXIS = "data"  # batch rows
MODEL_AXIS = "model"  # attention heads and MLP hidden units (Megatron-style column / row splits)
EXPERT_AXIS = "expert"  # stacked MoE expert weights
SEQ_AXIS = "seq"  # the cache's slot axis (long contexts: per-head caches split their slots over it)
MESH_AXES = (DATA_AXIS, MODEL_AXIS, EXPERT_AXIS, SEQ_AXIS)


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


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4} (order kept; whitespace ignored).

    Axis names must be among MESH_AXES, each at most once, sizes integers >= 1; every violation is
    a one-line ValueError naming the axis and the size.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec {spec!r} is empty; expected e.g. 'data=2,model=4'")
    axes: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not name or not size:
            raise ValueError(f"mesh spec entry {item.strip()!r} is not axis=size (e.g. 'data=2,model=4')")
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; allowed: {', '.join(MESH_AXES)}")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} is given twice in {spec!r}")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes must be integers >= 1") from None
        if n < 1:
            raise ValueError(f"mesh axis {name!r} has size {n}; sizes must be integers >= 1")
        axes[name] = n
    return axes


def mesh_from_spec(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a spec string ("data=2,model=4", see `parse_mesh_spec`) or an {axis: size} dict,
    over the first prod(sizes) of `devices` (default: all devices). A mesh larger than the device
    count is a ValueError naming the axes, their product and the device count."""
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else parse_mesh_spec(
        ",".join(f"{k}={v}" for k, v in dict(spec).items()))
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if need > len(devices):
        sizes = " x ".join(f"{k}={v}" for k, v in axes.items())
        raise ValueError(f"mesh {sizes} needs {need} devices, only {len(devices)} available "
                         "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return make_mesh(tuple(axes.values()), tuple(axes), devices=devices[:need])


__all__ = ["DATA_AXIS", "EXPERT_AXIS", "MESH_AXES", "MODEL_AXIS", "SEQ_AXIS", "expert_mesh", "make_mesh",
           "mesh_from_spec", "named", "parse_mesh_spec", "shard_map"]
