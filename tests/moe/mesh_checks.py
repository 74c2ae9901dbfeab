"""Checks that need 8 CPU devices; run by test_moe_distributed.py in a subprocess whose XLA_FLAGS
give it 8 devices. Prints one JSON line of measurements that the test asserts on."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.attention.reference import decode_attention as reference_decode_attention
from pikv_jax.moe import PiKVMoE
from pikv_jax.moe import expert_cache as xc
from pikv_jax.moe.distributed import DistributedPiKVMoE, place_on_mesh, token_sharding
from pikv_jax.parallel import expert_mesh

H, E, K = 32, 8, 2


def with_lora(m):
    for name in ("gate_proj", "down_proj"):
        v = getattr(m.experts, name + "_lora_b")
        v[...] = 0.1 * jax.random.normal(jax.random.key(len(name)), v[...].shape)
    return m


def pair(mesh, *, capacity_factor, grouped):
    kw = dict(rank=2, alpha=4.0, capacity_factor=capacity_factor)
    single = with_lora(PiKVMoE(H, E, K, rngs=nnx.Rngs(0), num_groups=8 if grouped else 1, **kw))
    dist = DistributedPiKVMoE(H, E, K, rngs=nnx.Rngs(0), mesh=mesh, **kw)
    nnx.update(dist, nnx.state(single))
    return single, dist


def main():
    out = {"devices": jax.device_count()}
    mesh = expert_mesh(2, 4)
    out["mesh"] = dict(mesh.shape)
    x = jax.random.normal(jax.random.key(1), (4, 32, H))

    # 1. no drops: the distributed layer equals the plain single-device layer
    single, dist = pair(mesh, capacity_factor=float(E) / K, grouped=False)
    y_single = np.asarray(single(x))
    out["balanced_eager_diff"] = float(np.abs(np.asarray(dist(x)) - y_single).max())
    place_on_mesh(dist)
    graphdef, state = nnx.split(dist)
    experts_sharding = state["experts"]["gate_proj"][...].sharding
    out["expert_weights_spec"] = str(experts_sharding.spec)
    x_sharded = jax.device_put(x.reshape(-1, H), token_sharding(dist))
    y_jit = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x)[0])(state, x_sharded)
    out["balanced_jit_diff"] = float(np.abs(np.asarray(y_jit).reshape(x.shape) - y_single).max())
    out["output_spec"] = str(y_jit.sharding.spec)

    # gradients through shard_map + all_to_all equal the single-device gradients
    def grads(m):
        gd, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(params, rest):
            y, aux = nnx.merge(gd, params, rest, copy=True).forward(x)
            return jnp.mean(jnp.square(y)) + aux.loss

        return jax.jit(jax.grad(loss))(params, rest)

    gs, gdist = grads(single), grads(dist)
    out["grad_diff"] = max(float(jnp.abs(a - b).max()) for a, b in
                           zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(gdist)))

    # 2. skewed load with drops: equals the single-device layer with one capacity group per device
    single, dist = pair(mesh, capacity_factor=1.0, grouped=True)
    xs = x + 3.0 * single.router.gate.kernel[...][:, 0]
    y_single = np.asarray(single(xs))
    y_dist = np.asarray(dist(xs))
    s1, s2 = single.get_stats(), dist.get_stats()
    out["skewed_diff"] = float(np.abs(y_dist - y_single).max())
    out["skewed_dropped"] = [s1["dropped"], s2["dropped"]]
    out["skewed_max_load"] = max(s2["expert_load"])
    out["skewed_processed_equal"] = s1["processed_per_expert"] == s2["processed_per_expert"]

    # 3. errors
    try:
        DistributedPiKVMoE(H, 6, K, rngs=nnx.Rngs(0), mesh=mesh)
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    try:
        dist(jax.random.normal(jax.random.key(2), (12, H)))
        out["token_error"] = None
    except ValueError as e:
        out["token_error"] = str(e)

    # 4. expert-sharded KV cache with its shards spread over the expert axis
    b, hkv, g, d, s = 2, 2, 2, 8, 20
    ks = jax.random.split(jax.random.key(3), 4)
    k, v = jax.random.normal(ks[0], (b, s, hkv, d)), jax.random.normal(ks[1], (b, s, hkv, d))
    expert = jax.random.randint(ks[2], (b, s), 0, 4)
    cache = xc.write_tokens(xc.init_expert_sharded_cache(4, b, hkv, 8, d), k, v,
                            jnp.broadcast_to(jnp.arange(s), (b, s)), expert)
    q = jax.random.normal(ks[3], (b, hkv * g, d))
    q_pos = jnp.array([s - 1, s - 1])
    shard_spec = NamedSharding(mesh, P("expert"))
    placed = cache.replace(k=jax.device_put(cache.k, shard_spec), v=jax.device_put(cache.v, shard_spec),
                           pos=jax.device_put(cache.pos, shard_spec))
    out["cache_experts_per_device"] = sorted({sh.data.shape[0] for sh in placed.k.addressable_shards})
    out_jit, _ = jax.jit(xc.decode_attention)(q, placed, q_pos)
    out_map = xc.sharded_decode_attention(q, placed, q_pos, mesh)
    ref, _ = reference_decode_attention(q, *xc.as_unsharded(cache), q_pos)
    out["sharded_cache_jit_diff"] = float(jnp.abs(out_jit - ref).max())
    out["sharded_cache_shard_map_diff"] = float(jnp.abs(out_map - ref).max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
