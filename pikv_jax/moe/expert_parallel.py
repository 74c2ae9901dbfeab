"""Expert parallelism for MoE generation: local experts on every local token, one psum over `expert`.

A sharded model (`PiKVModel(..., mesh=...)` with an `expert` mesh axis) stores its stacked expert
weights [E, ...] split over `expert` (pikv_jax/parallel/sharding.py). Left to the SPMD partitioner,
the dropless `ragged_dot` path gathers every token over `data` and all-reduces each projection's
[T*K, F] output over `expert`. This path keeps tokens where they are instead:

  1. outside the `shard_map`, in the global view: the router's decision and which assignments are
     kept (all of them when dropless; the capacity queue positions otherwise, over the same groups
     as one device, so the same assignments are dropped);
  2. per device (tokens split over `data`, experts over `expert`, replicated over the rest): the
     assignments whose expert is local are sorted by local expert and run through `ragged_dot`
     against the local weights only, then combined with their gates into y_part f32[T/D, H];
  3. y = psum(y_part, `expert`): one activation-sized all-reduce per MoE layer.

Every kept assignment is computed on exactly one `expert` shard and weighted there, so the psum
adds each token's K expert outputs (zeros from the shards that hold none of its experts). With
K = 2 the sum has the same two terms as one device's combine, in either order (exact).

Why not the capacity `all_to_all` of `DistributedPiKVMoE`: a decode step has B tokens, fewer
than the data x expert shards it would split them into, and its [E, C, H] slot buffers are
larger than the [T, H] psum for any capacity C >= 1 when E >= T; the psum needs no token split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from pikv_jax.moe.dispatch import sort_by_expert, unsort_and_combine
from pikv_jax.moe.experts import experts_ragged
from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, shard_map


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Static placement of an MoE layer on `mesh` (hashable: part of the model's graph definition).

    expert_axis: the mesh axis the stacked expert weights are split over (its size divides E);
    data_axis: the mesh axis token rows are split over (ignored when the mesh lacks it)."""

    mesh: Mesh
    expert_axis: str = EXPERT_AXIS
    data_axis: str = DATA_AXIS

    @property
    def num_shards(self) -> int:
        return int(dict(self.mesh.shape)[self.expert_axis])

    def check(self, num_experts: int) -> "ExpertParallel":
        """Raises a one-line ValueError unless the mesh has `expert_axis` and its size divides E."""
        sizes = dict(self.mesh.shape)
        if self.expert_axis not in sizes:
            raise ValueError(f"expert_axis={self.expert_axis!r} is not an axis of the mesh; mesh axes: {tuple(sizes)}")
        if num_experts % sizes[self.expert_axis]:
            raise ValueError(f"num_experts={num_experts} is not divisible by the {self.expert_axis!r} mesh axis size "
                             f"{sizes[self.expert_axis]}")
        return self

    def token_axis(self, num_tokens: int) -> str | None:
        """The axis tokens are split over inside the layer: `data_axis` when it divides them."""
        d = dict(self.mesh.shape).get(self.data_axis)
        return self.data_axis if d is not None and num_tokens % d == 0 else None


def local_experts_output(x: Float[Array, "t h"], expert_idx: Int[Array, "t k"], gates: Float[Array, "t k"],
                         kept: Bool[Array, "t k"], weights: dict, *, first: Int[Array, ""] | int,
                         lora_scale: float = 1.0) -> Float[Array, "t h"]:
    """The part of y[t] = sum_k kept * gate * expert_{idx[t, k]}(x[t]) that the experts in `weights`
    (stacked [E_local, ...], global ids first .. first + E_local - 1) produce; other assignments add 0."""
    e_local = weights["gate_proj"].shape[0]
    local = expert_idx - first
    mine = kept & (local >= 0) & (local < e_local)
    sd = sort_by_expert(jnp.where(mine, local, 0), mine, e_local)
    ys = experts_ragged(weights, x[sd.token], sd.group_sizes, lora_scale)
    return unsort_and_combine(ys, sd, gates, mine)


def expert_parallel_output(ep: ExpertParallel, x2: Float[Array, "t h"], expert_idx: Int[Array, "t k"],
                           gates: Float[Array, "t k"], kept: Bool[Array, "t k"], weights: dict,
                           lora_scale: float = 1.0) -> Float[Array, "t h"]:
    """f32[T, H]: the MoE combine of the kept assignments, experts split over `ep.expert_axis`
    (see the module docstring). weights: stacked [E, ...] arrays, placed P(expert_axis)."""
    tok = P(ep.token_axis(x2.shape[0]))
    axis = ep.expert_axis

    def body(x, idx, g, k, w):
        first = jax.lax.axis_index(axis) * w["gate_proj"].shape[0]
        y = local_experts_output(x, idx, g, k, w, first=first, lora_scale=lora_scale)
        return jax.lax.psum(y, axis)

    fn = shard_map(body, mesh=ep.mesh, in_specs=(tok, tok, tok, tok, {k: P(axis) for k in weights}), out_specs=tok)
    return fn(x2, expert_idx, gates, kept, weights)


__all__ = ["ExpertParallel", "expert_parallel_output", "local_experts_output"]
