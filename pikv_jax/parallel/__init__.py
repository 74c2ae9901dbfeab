"""Mesh construction, sharding rules and multi-host initialisation."""

from pikv_jax.parallel.mesh import (
    DATA_AXIS,
    EXPERT_AXIS,
    MESH_AXES,
    MODEL_AXIS,
    SEQ_AXIS,
    expert_mesh,
    make_mesh,
    mesh_from_spec,
    named,
    parse_mesh_spec,
    shard_map,
)
from pikv_jax.parallel.multihost import initialize, use_cpu_collectives
from pikv_jax.parallel.sharding import (
    PARAM_RULES,
    global_array,
    param_spec,
    shard_state,
    split_counts,
    state_shardings,
    token_spec,
)

__all__ = ["DATA_AXIS", "EXPERT_AXIS", "MESH_AXES", "MODEL_AXIS", "PARAM_RULES", "SEQ_AXIS", "expert_mesh",
           "global_array", "initialize", "make_mesh", "mesh_from_spec", "named", "param_spec", "parse_mesh_spec",
           "shard_map", "shard_state", "split_counts", "state_shardings", "token_spec", "use_cpu_collectives"]
