"""Expert-sharded KV cache, the PiKV paper's central idea.

Semantics
---------
The cache of one layer is split into E shards, one per expert. Each token's key and value live in
the shard of the expert its router chose (top-1 choice), so on an expert-parallel mesh an expert's
device holds its own shard and the KV entries of the tokens it serves never leave it.

- Layout: k, v [E, B, Hkv, C_e, D]; pos i32[E, B, Hkv, C_e] (original token position, -1 = empty);
  length i32[B] tokens seen per row; spilled / dropped i32[B] counters.
- Write (`write_tokens`): token t of row b goes to shard e = expert[b, t] (the top-1 expert of any
  router, e.g. `route_top1(router, hidden)`), into the shard's next free slot. Shards fill as
  contiguous prefixes. If the chosen shard is full the token *spills* to the first free slot in shard
  order (counted in `spilled`); only when every shard is full is it dropped (counted in `dropped`).
  Placement never changes what attention sees, only where it is stored.
- Attention (`decode_attention`): every shard computes a partial softmax over its own slots,
  (o_e normalised within the shard, m_e = max logit, l_e = sum exp(logit - m_e)) per query head, and
  the partials are merged with the log-sum-exp rule
      M = max_e m_e,  w_e = exp(m_e - M) * l_e,  o = sum_e w_e o_e / sum_e w_e,
  which is exactly softmax attention over the union of the shards, i.e. equal (to rounding) to
  `attention.reference.decode_attention` on an unsharded cache holding the same tokens. On a mesh the
  merge is a `pmax` and two `psum`s over the expert axis (`sharded_decode_attention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pikv_jax.attention.reference import NEG_INF, reduce_group, visible
from pikv_jax.parallel.mesh import shard_map

EMPTY = -1


def _pytree(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])


@_pytree
class ExpertShardedKVCache:
    """One layer's KV cache split into per-expert shards (see the module docstring)."""

    k: jax.Array  # [E, B, Hkv, C_e, D]
    v: jax.Array  # [E, B, Hkv, C_e, D]
    pos: jax.Array  # i32[E, B, Hkv, C_e]
    length: jax.Array  # i32[B]
    spilled: jax.Array  # i32[B] tokens stored outside their expert's (full) shard
    dropped: jax.Array  # i32[B] tokens not stored (every shard full)

    @property
    def num_experts(self) -> int:
        return self.pos.shape[0]

    @property
    def batch(self) -> int:
        return self.pos.shape[1]

    @property
    def shard_capacity(self) -> int:
        return self.pos.shape[3]

    def replace(self, **kw) -> "ExpertShardedKVCache":
        return dataclasses.replace(self, **kw)

    def tokens_per_shard(self) -> jax.Array:
        """i32[B, E]: tokens of each row held by each expert's shard (PiKVRouter's cache_affinity)."""
        return jnp.sum(self.pos[:, :, 0, :] >= 0, axis=-1).T.astype(jnp.int32)

    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))


def init_expert_sharded_cache(num_experts: int, batch: int, num_kv_heads: int, shard_capacity: int,
                              head_dim: int, dtype=jnp.float32) -> ExpertShardedKVCache:
    for name, v in (("num_experts", num_experts), ("batch", batch), ("num_kv_heads", num_kv_heads),
                    ("shard_capacity", shard_capacity), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    shape = (num_experts, batch, num_kv_heads, shard_capacity)
    return ExpertShardedKVCache(
        k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, EMPTY, jnp.int32), length=jnp.zeros((batch,), jnp.int32),
        spilled=jnp.zeros((batch,), jnp.int32), dropped=jnp.zeros((batch,), jnp.int32))


def route_top1(router, x, **router_inputs):
    """i32[...]: the top-1 expert of each token of x[..., H] under `router` (eval mode)."""
    routing = router.route(x, **router_inputs)
    return routing.expert_idx[:, 0].reshape(x.shape[:-1])


def _check_expert_ids(expert, num_experts: int):
    """Eager inputs get a clear error for expert ids outside [0, E) (traced ones cannot be inspected)."""
    if isinstance(expert, jax.core.Tracer):
        return
    ids = np.asarray(expert)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}), got values in [{ids.min()}, {ids.max()}]")


def write_tokens(cache: ExpertShardedKVCache, k, v, pos, expert) -> ExpertShardedKVCache:
    """Appends S tokens per row, each into its expert's shard.

    k, v: [B, S, Hkv, D]; pos: i32[B, S] (-1 = padding, not stored); expert: i32[B, S] in [0, E).
    1. fill[B, E] = slots already used per shard; one_hot[B, S, E] of the valid tokens' experts.
    2. slot = fill[expert] + (rank of the token among this call's tokens of the same expert).
    3. slot < C_e: store there. Otherwise the token spills: the r-th spilled token of a row takes the
       r-th free slot left in shard-major order (shards stay contiguous prefixes); none left: dropped.
    4. One scatter writes k, v, pos at (shard, row, :, slot); dropped targets are out of range.
    """
    e, b, hk, c = cache.pos.shape
    s = pos.shape[1]
    if expert.shape != pos.shape or k.shape[:2] != pos.shape:
        raise ValueError(f"expert {tuple(expert.shape)}, pos {tuple(pos.shape)} and k {tuple(k.shape)} must share "
                         f"their leading [B, S] shape")
    _check_expert_ids(expert, e)
    valid = pos >= 0
    onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32) * valid[..., None]  # [B, S, E]
    fill = jnp.transpose(jnp.sum(cache.pos[:, :, 0, :] >= 0, axis=-1)).astype(jnp.int32)  # [B, E]
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [B, S]
    slot = jnp.take_along_axis(fill, expert, axis=1) + rank
    primary = valid & (slot < c)
    overflow = valid & ~primary
    # free slots after the primary placement, shard-major
    used = fill + jnp.sum(onehot * primary[..., None], axis=1)  # [B, E]
    free = jnp.arange(c)[None, None, :] >= jnp.minimum(used, c)[:, :, None]  # [B, E, C]
    free_flat = free.reshape(b, e * c)
    free_order = jnp.argsort(~free_flat, axis=-1, stable=True).astype(jnp.int32)  # free slots first
    n_free = jnp.sum(free_flat, axis=-1)
    r = jnp.cumsum(overflow, axis=1) - 1  # [B, S]
    spill_ok = overflow & (r < n_free[:, None])
    spill_flat = jnp.take_along_axis(free_order, jnp.clip(r, 0, e * c - 1), axis=1)
    tgt_e = jnp.where(primary, expert, jnp.where(spill_ok, spill_flat // c, 0))
    tgt_c = jnp.where(primary, slot, jnp.where(spill_ok, spill_flat % c, c))  # c = out of range, dropped
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    new_pos = jnp.broadcast_to(pos[:, :, None], (b, s, hk)).astype(jnp.int32)
    upd = dict(mode="drop")
    return cache.replace(
        k=cache.k.at[tgt_e, bi, :, tgt_c].set(k.astype(cache.k.dtype), **upd),
        v=cache.v.at[tgt_e, bi, :, tgt_c].set(v.astype(cache.v.dtype), **upd),
        pos=cache.pos.at[tgt_e, bi, :, tgt_c].set(new_pos, **upd),
        length=jnp.maximum(cache.length, jnp.max(jnp.where(valid, pos + 1, 0), axis=1)).astype(jnp.int32),
        spilled=cache.spilled + jnp.sum(spill_ok, axis=1).astype(jnp.int32),
        dropped=cache.dropped + jnp.sum(overflow & ~spill_ok, axis=1).astype(jnp.int32))


def write_token(cache: ExpertShardedKVCache, k, v, pos, expert, active=None) -> ExpertShardedKVCache:
    """One decoded token per row. k, v: [B, Hkv, D]; pos, expert: i32[B]; active: bool[B] (None = all)."""
    if active is not None:
        pos = jnp.where(active, pos, -1)
    return write_tokens(cache, k[:, None], v[:, None], pos[:, None], expert[:, None])


def shard_partial_attention(q, k, v, k_pos, q_pos, *, sliding_window: int | None = None):
    """Partial softmax attention of one query per row over one shard.

    q: [B, H, D]; k, v: [B, Hkv, C, D]; k_pos: i32[B, Hkv, C]; q_pos: i32[B].
    Returns o f32[B, H, D] (normalised within the shard, 0 if nothing is visible), m f32[B, H] (max
    visible logit, NEG_INF if none), l f32[B, H] (sum of exp(logit - m) over visible slots) and the
    unnormalised probabilities p f32[B, Hkv, G, C] (for per-slot attention mass).
    """
    b, h, d = q.shape
    hk = k.shape[1]
    qg = q.reshape(b, hk, h // hk, d)
    logits = jnp.einsum("bhgd,bhcd->bhgc", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, None, None], k_pos[:, :, None, :], sliding_window)
    logits = jnp.where(mask, logits, NEG_INF)
    m = jnp.max(logits, axis=-1)  # [B, Hkv, G]
    p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgc,bhcd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.maximum(l, 1e-30)[..., None]
    return o.reshape(b, h, d), m.reshape(b, h), l.reshape(b, h), p


def merge_partials(o, m, l, axis_name: str | None = None):
    """Log-sum-exp merge of per-shard partials over the leading shard axis (and, with `axis_name`,
    across the devices of that mesh axis).

    o: f32[E, B, H, D]; m, l: f32[E, B, H]. Returns (out f32[B, H, D], M f32[B, H], L f32[B, H]) with
    M the global max logit and L = sum_e exp(m_e - M) l_e the global softmax denominator.
    """
    big_m = jnp.max(m, axis=0)
    if axis_name is not None:
        big_m = jax.lax.pmax(big_m, axis_name)
    w = jnp.exp(m - big_m[None]) * l  # [E, B, H]
    num = jnp.sum(w[..., None] * o, axis=0)
    den = jnp.sum(w, axis=0)
    if axis_name is not None:
        num, den = jax.lax.psum(num, axis_name), jax.lax.psum(den, axis_name)
    return num / jnp.maximum(den, 1e-30)[..., None], big_m, den


def _shard_mass(p, m, big_m, den, group_reduce):
    """Per-slot softmax probability of each shard, reduced over the GQA group -> f32[E, B, Hkv, C]."""
    e, b, hk, g, _ = p.shape
    scale = jnp.exp(m - big_m[None]) / jnp.maximum(den, 1e-30)[None]  # [E, B, H]
    probs = p * scale.reshape(e, b, hk, g)[..., None]
    return reduce_group(probs, group_reduce, axis=3)


def decode_attention(q, cache: ExpertShardedKVCache, q_pos, *, sliding_window: int | None = None,
                     group_reduce: str = "mean"):
    """One query per row over all shards. q: [B, H, D]; q_pos: i32[B].

    Returns out [B, H, D] (q's dtype) and mass f32[E, B, Hkv, C_e] (each slot's softmax probability,
    reduced over the query heads of its KV head; 0 for empty slots).
    """
    part = jax.vmap(lambda k, v, p: shard_partial_attention(q, k, v, p, q_pos, sliding_window=sliding_window))
    o, m, l, p = part(cache.k, cache.v, cache.pos)
    out, big_m, den = merge_partials(o, m, l)
    return out.astype(q.dtype), _shard_mass(p, m, big_m, den, group_reduce)


def sharded_decode_attention(q, cache: ExpertShardedKVCache, q_pos, mesh, *, expert_axis: str = "expert",
                             sliding_window: int | None = None):
    """`decode_attention` with the shards distributed over `expert_axis` of `mesh` by `shard_map`:
    each device attends over its own shards and the partials meet in one pmax + two psums.
    Returns out [B, H, D] replicated on every device."""

    n = mesh.shape[expert_axis]
    if cache.num_experts % n:
        raise ValueError(f"num_experts={cache.num_experts} is not divisible by the {expert_axis!r} mesh axis "
                         f"size {n}")

    def local(q, k, v, pos, q_pos):
        part = jax.vmap(lambda k, v, p: shard_partial_attention(q, k, v, p, q_pos, sliding_window=sliding_window))
        o, m, l, _ = part(k, v, pos)
        return merge_partials(o, m, l, axis_name=expert_axis)[0].astype(q.dtype)

    shard = P(expert_axis)
    fn = shard_map(local, mesh=mesh, in_specs=(P(), shard, shard, shard, P()), out_specs=P())
    return fn(q, cache.k, cache.v, cache.pos, q_pos)


def as_unsharded(cache: ExpertShardedKVCache):
    """(k, v [B, Hkv, E*C_e, D], pos i32[B, Hkv, E*C_e]): the same tokens in one slot-ordered cache,
    the layout `attention.reference.decode_attention` takes (for tests and inspection)."""
    e, b, hk, c, d = cache.k.shape
    flat = lambda x: jnp.moveaxis(x, 0, 2).reshape((b, hk, e * c) + x.shape[4:])
    return flat(cache.k), flat(cache.v), flat(cache.pos)


__all__ = ["ExpertShardedKVCache", "as_unsharded", "decode_attention", "init_expert_sharded_cache",
           "merge_partials", "route_top1", "shard_partial_attention", "sharded_decode_attention",
           "write_token", "write_tokens"]
