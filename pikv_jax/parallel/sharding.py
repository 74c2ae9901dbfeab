"""One place for sharding rules: which mesh axis each parameter and activation is split over.

Expert parallelism: stacked expert weights [E, ...] (and their LoRA factors) are split over the
`expert` axis; routers, shared experts and everything else are replicated. Tokens are split over
every mesh axis at once (data x expert), so each device routes its own slice of the batch.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS

EXPERT_PARAM_OWNER = "experts"  # stacked expert weights live under a submodule of this name


def param_spec(path: tuple, value, *, expert_axis: str = EXPERT_AXIS) -> P:
    """PartitionSpec of one parameter given its NNX state path."""
    names = [str(p) for p in path]
    if EXPERT_PARAM_OWNER in names[:-1] and getattr(value, "ndim", 0) >= 3:
        return P(expert_axis)
    return P()


def token_spec(axes=(DATA_AXIS, EXPERT_AXIS)) -> P:
    """Tokens [T, H]: the token axis split over all the given mesh axes."""
    return P(tuple(axes))


def state_shardings(state: nnx.State, mesh: Mesh, *, expert_axis: str = EXPERT_AXIS):
    """A pytree of NamedShardings matching `state` (from `nnx.split`) under the rules above."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        spec = param_spec(path, value, expert_axis=expert_axis) if hasattr(value, "ndim") else P()
        flat.append((path, var.replace(NamedSharding(mesh, spec)) if hasattr(value, "ndim") else var))
    return nnx.from_flat_state(flat)


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a host value every process holds in full (works across
    processes: each one fills only its addressable shards)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: nnx.State, mesh: Mesh, *, expert_axis: str = EXPERT_AXIS) -> nnx.State:
    """Places every array of `state` on `mesh` according to `param_spec` (multi-process safe when
    every process holds the same full values, e.g. built from the same seed)."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if hasattr(value, "ndim"):
            spec = param_spec(path, value, expert_axis=expert_axis)
            value = global_array(value, NamedSharding(mesh, spec))
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


__all__ = ["global_array", "param_spec", "shard_state", "state_shardings", "token_spec"]
