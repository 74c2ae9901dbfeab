"""Mesh construction, sharding rules and multi-host initialisation."""

from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, expert_mesh, make_mesh, named, shard_map
from pikv_jax.parallel.multihost import initialize, use_cpu_collectives
from pikv_jax.parallel.sharding import global_array, param_spec, shard_state, state_shardings, token_spec

__all__ = ["DATA_AXIS", "EXPERT_AXIS", "expert_mesh", "global_array", "initialize", "make_mesh", "named", "param_spec",
           "shard_map", "shard_state", "state_shardings", "token_spec", "use_cpu_collectives"]
