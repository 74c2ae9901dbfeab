"""DistributedPiKVMoE: expert parallelism over a ("data", "expert") device mesh with `shard_map`.

Layout (mesh of D x N devices, E experts, E % N == 0):
- stacked expert weights [E, ...] are split over `expert` (device (d, j) holds experts
  j*E/N .. (j+1)*E/N - 1) and replicated over `data`;
- tokens [T, H] are split over both axes: device (d, j) holds token block d*N + j (row-major, the
  same order as `PiKVMoE(num_groups=D*N)` numbers its groups);
- the router is replicated and runs outside the `shard_map` in the global view (so its auxiliary
  loss and statistics are the global ones), its decision is split like the tokens.

Per device (one `shard_map` body):
  1. capacity dispatch of the local tokens into expert_in[E, g*C, H] (g = num_groups per device);
  2. all_to_all over `expert` (split E, concat slots): [E/N, N*g*C, H], each device now holds the
     slots every peer filled for its own experts;
  3. the local experts run on them;
  4. all_to_all back (split slots, concat E): [E, g*C, H];
  5. combine with the local gates -> y for the local tokens.
Capacity is fixed (static shapes), so this runs on CPU; the output equals single-device
`PiKVMoE(num_groups=D*N*g)` exactly, and equals the ungrouped layer whenever nothing is dropped.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.moe.experts import experts_capacity
from pikv_jax.moe.pikv_moe import PiKVMoE, grouped_capacity_moe
from pikv_jax.moe.routers.base import Routing
from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, expert_mesh, shard_map
from pikv_jax.parallel.sharding import shard_state


def default_expert_mesh(num_experts: int) -> Mesh:
    """A (1, n) ("data", "expert") mesh over the first n local devices, n the largest count of local
    devices that divides `num_experts`."""
    devices = jax.local_devices()
    n = max(d for d in range(1, len(devices) + 1) if num_experts % d == 0)
    return expert_mesh(1, n, devices=devices[:n])


class DistributedPiKVMoE(PiKVMoE):
    """`PiKVMoE` whose experts are sharded over the `expert_axis` of `mesh` (see the module docstring).

    Takes PiKVMoE's arguments plus `mesh`, `data_axis`, `expert_axis`. `num_groups` is the number of
    capacity groups per device. Built with the same arguments and seed as a PiKVMoE it has the same
    parameters (or copy them with `nnx.update(dist, nnx.state(moe))`).

    Without a mesh (the seed's `DistributedPiKVMoE(rank=4, alpha=1.0, use_distillation=True)`), the
    experts are spread over this process's devices: a (1, n) ("data", "expert") mesh over the first n
    local devices, n the largest device count that divides num_experts (1 on a single device).
    """

    def __init__(self, *args, mesh: Mesh | None = None, data_axis: str = DATA_AXIS, expert_axis: str = EXPERT_AXIS,
                 **kw):
        super().__init__(*args, **kw)
        if mesh is None:
            mesh = default_expert_mesh(self.num_experts)
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        for name, axis in (("data_axis", data_axis), ("expert_axis", expert_axis)):
            if axis not in mesh.shape:
                raise ValueError(f"{name}={axis!r} is not an axis of the mesh; mesh axes: {tuple(mesh.shape)}")
        n = mesh.shape[expert_axis]
        if self.num_experts % n:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the {expert_axis!r} mesh axis "
                             f"size {n}; use a number of experts that is a multiple of {n}")
        if self.dropless:
            raise ValueError("DistributedPiKVMoE dispatches at a fixed capacity; dropless=True is single-device "
                             "only (use capacity_factor >= num_experts / top_k for no drops)")
        self.mesh, self.data_axis, self.expert_axis = mesh, data_axis, expert_axis

    @property
    def num_token_shards(self) -> int:
        return self.mesh.shape[self.data_axis] * self.mesh.shape[self.expert_axis]

    def capacity(self, num_tokens: int, training: bool = False) -> int:
        return self.router.capacity(num_tokens // (self.num_token_shards * self.num_groups), training)

    def _experts_output(self, x2, routing: Routing, training: bool):
        t = x2.shape[0]
        shards = self.num_token_shards
        if t % (shards * self.num_groups):
            raise ValueError(f"the number of tokens T={t} must be divisible by data x expert devices ({shards}) "
                             f"x num_groups ({self.num_groups})")
        cap = self.capacity(t, training)
        e, g, scale = self.num_experts, self.num_groups, self.experts.lora_scale
        ax_e = self.expert_axis
        all_axes = (self.data_axis, self.expert_axis)

        def local(x_l, idx, gates, active, weights):
            r = Routing(logits=None, probs=None, expert_idx=idx, gates=gates, active=active, aux_loss=None, aux={})

            def expert_fn(expert_in):  # [E, g*C, H] -> [E, g*C, H]
                mine = jax.lax.all_to_all(expert_in, ax_e, 0, 1, tiled=True)  # [E/N, N*g*C, H]
                out = experts_capacity(weights, mine, scale)
                return jax.lax.all_to_all(out, ax_e, 1, 0, tiled=True)

            y, processed, dropped = grouped_capacity_moe(x_l, r, e, cap, g, expert_fn)
            return y, jax.lax.psum(processed, all_axes), jax.lax.psum(dropped, all_axes)

        tok = P(all_axes)
        weights = self.experts.weights()
        w_specs = {k: P(ax_e) for k in weights}
        fn = shard_map(local, mesh=self.mesh, in_specs=(tok, tok, tok, tok, w_specs), out_specs=(tok, P(), P()))
        y, processed, dropped = fn(x2, routing.expert_idx, routing.gates, routing.active, weights)
        return y, processed, dropped, cap


def place_on_mesh(moe: DistributedPiKVMoE):
    """Puts the layer's arrays on its mesh under the sharding rules (experts split, rest replicated)."""

    nnx.update(moe, shard_state(nnx.state(moe), moe.mesh, expert_axis=moe.expert_axis))
    return moe


def token_sharding(moe: DistributedPiKVMoE):
    """NamedSharding for tokens [T, H] of this layer's mesh (split over data x expert)."""
    return NamedSharding(moe.mesh, P((moe.data_axis, moe.expert_axis)))


__all__ = ["DistributedPiKVMoE", "place_on_mesh", "token_sharding"]
