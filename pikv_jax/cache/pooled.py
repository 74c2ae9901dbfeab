"""Pooled layer cache: one pool of P token slots per row, shared by the KV heads of a layer.

A uniform `LayerCache` gives every KV head the same C slots, so per-head budgets that differ
(AdaKV) or heads that need only a few tokens (DuoAttention's streaming heads) would either waste
memory or need masking. Here each slot carries the KV head that owns it, so a layer allocates
exactly the slots its heads use together:

    k, v:   [B, P, D]   keys after RoPE, values
    pos:    i32[B, P]   original token position, -1 = empty
    head:   i32[B, P]   owning KV head, -1 = unassigned (free for any head)
    score:  f32[B, P]   policy accumulator
    extra:  dict of policy state arrays

Ownership is either dynamic (AdaKV: prefill assigns slots, decoded tokens take free slots) or
static (`segments`: head h owns slots [start_h, end_h), DuoAttention), in which case attention runs
head by head over its own range and reads each key exactly once.

Decode attention over the pool computes, for query head j of KV head h = j // G, the softmax over
the slots with head == h (and a visible position); the per-slot mass is reduced over the G query
heads of the slot's own head. Empty slots get exactly 0 and never produce NaN.
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b p d" are not forward references)

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Float32, Int, Int32

from pikv_jax.attention import reference
from pikv_jax.cache.state import EMPTY, SlotCacheBase, pytree_dataclass, static_field

UNASSIGNED = -1  # head value of a slot no head owns yet


@pytree_dataclass
class PooledLayerCache(SlotCacheBase):
    """One layer's cache as a pool of P slots per row, each owned by one KV head (see module doc).

    num_kv_heads: KV heads sharing the pool (static). segments: static per-head slot ranges
    ((start, end) per head) when ownership is fixed, else None.
    """

    k: Float[Array, "b p d"]
    v: Float[Array, "b p d"]
    pos: Int32[Array, "b p"]
    head: Int32[Array, "b p"]
    score: Float[Array, "b p"]
    num_kv_heads: int = static_field()
    segments: tuple[tuple[int, int], ...] | None = static_field(default=None)
    extra: dict[str, Any] = struct.field(default_factory=dict)

    def head_positions(self) -> Int32[Array, "b hk p"]:
        """i32[B, Hkv, P]: pos where the slot belongs to head h, else -1 (layout-independent view)."""
        mine = self.head[:, None, :] == jnp.arange(self.num_kv_heads, dtype=jnp.int32)[None, :, None]
        return jnp.where(mine, self.pos[:, None, :], EMPTY)

    def dense_kv(self, dtype=jnp.float32):
        """Keys and values [B, Hkv, P, D] aligned with `head_positions()` (zeros where a slot belongs
        to another head)."""
        mine = (self.head_positions() >= 0)[..., None]
        return (jnp.where(mine, self.k[:, None].astype(dtype), 0), jnp.where(mine, self.v[:, None].astype(dtype), 0))


def segments_from_sizes(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Static contiguous slot ranges for per-head sizes: (3, 2) -> ((0, 3), (3, 5))."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + int(n)))
        start += int(n)
    return tuple(out)


def init_pooled_cache(batch: int, num_kv_heads: int, slots: int, head_dim: int, dtype, *,
                      segments: tuple[tuple[int, int], ...] | None = None,
                      extra: dict[str, Any] | None = None) -> PooledLayerCache:
    """An empty pool of `slots` slots per row; with `segments`, slot ranges are owned statically."""
    if slots < 1:
        raise ValueError(f"pool size (slots) must be >= 1, got {slots}")
    if segments is not None:
        if len(segments) != num_kv_heads:
            raise ValueError(f"segments has {len(segments)} ranges, expected one per KV head ({num_kv_heads})")
        if segments[-1][1] != slots or any(a[1] != b[0] for a, b in zip(segments, segments[1:])):
            raise ValueError(f"segments {segments} must tile [0, {slots}) contiguously")
        owner = jnp.concatenate([jnp.full((e - s,), h, jnp.int32) for h, (s, e) in enumerate(segments)])
        head = jnp.broadcast_to(owner[None, :], (batch, slots))
    else:
        head = jnp.full((batch, slots), UNASSIGNED, jnp.int32)
    return PooledLayerCache(
        k=jnp.zeros((batch, slots, head_dim), dtype),
        v=jnp.zeros((batch, slots, head_dim), dtype),
        pos=jnp.full((batch, slots), EMPTY, jnp.int32),
        head=head,
        score=jnp.zeros((batch, slots), jnp.float32),
        num_kv_heads=num_kv_heads,
        segments=segments,
        extra=dict(extra or {}),
    )


def gather_prompt_pooled(cache: PooledLayerCache, k: Float[Array, "b s hk d"], v: Float[Array, "b s hk d"],
                         pos: Int[Array, "b s"], keep: Bool[Array, "b hk s"],
                         score: Float[Array, "b hk s"] | None = None) -> PooledLayerCache:
    """Writes each head's kept prompt tokens into an empty pool (the pooled `write_prompt`).

    k, v: [B, S, Hkv, D]; pos: i32[B, S] (-1 = padding); keep: bool[B, Hkv, S] (padding is never
    kept); score: optional f32[B, Hkv, S]. Kept tokens of head h go in chronological order into
    consecutive slots: from the start of h's segment with static ownership, else head after head
    from slot 0 (slot = rank of (h, s) among kept entries, flattened head-major). The caller
    guarantees the selection fits (per segment, or P in total); entries past it are dropped.
    """
    b, s, hk, d = k.shape
    p = cache.capacity
    keep = keep & (pos[:, None, :] >= 0)
    if cache.segments is not None:
        starts = jnp.asarray([a for a, _ in cache.segments], jnp.int32)
        ends = jnp.asarray([e for _, e in cache.segments], jnp.int32)
        slot = starts[None, :, None] + jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
        keep = keep & (slot < ends[None, :, None])
    else:
        slot = (jnp.cumsum(keep.reshape(b, hk * s), axis=-1, dtype=jnp.int32) - 1).reshape(b, hk, s)
    slot = jnp.where(keep, slot, p).reshape(b, hk * s)  # p = out of range -> dropped
    bi = jnp.arange(b)[:, None]
    flat = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, hk * s, d)
    pos_h = jnp.broadcast_to(pos[:, None, :], (b, hk, s)).reshape(b, hk * s).astype(jnp.int32)
    head_h = jnp.broadcast_to(jnp.arange(hk, dtype=jnp.int32)[None, :, None], (b, hk, s)).reshape(b, hk * s)
    sc = jnp.zeros((b, hk * s), jnp.float32) if score is None else score.astype(jnp.float32).reshape(b, hk * s)
    return cache.replace(
        k=cache.k.at[bi, slot].set(flat(k).astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[bi, slot].set(flat(v).astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[bi, slot].set(pos_h, mode="drop"),
        head=cache.head.at[bi, slot].set(head_h, mode="drop"),
        score=cache.score.at[bi, slot].set(sc, mode="drop"),
    )


def free_slots(cache: PooledLayerCache) -> tuple[Int32[Array, "b hk"], Bool[Array, "b hk"]]:
    """A free slot for each KV head: (slot i32[B, Hkv], ok bool[B, Hkv]).

    Head h takes a free slot it already owns if there is one (the first); otherwise an unassigned
    free slot: the r-th one in slot order, where r counts the heads before h that also need an
    unassigned slot, so two heads never get the same slot. ok is False when none is left.
    """
    hk = cache.num_kv_heads
    free = cache.pos < 0  # [B, P]
    owned = free[:, None, :] & (cache.head[:, None, :] == jnp.arange(hk, dtype=jnp.int32)[None, :, None])
    has_owned = jnp.any(owned, axis=-1)  # [B, Hkv]
    owned_slot = jnp.argmax(owned, axis=-1).astype(jnp.int32)
    unassigned = free & (cache.head < 0)  # [B, P]
    need = ~has_owned
    rank = jnp.cumsum(need, axis=-1, dtype=jnp.int32) - 1  # [B, Hkv]
    seen = jnp.cumsum(unassigned, axis=-1, dtype=jnp.int32)  # [B, P] unassigned slots up to and incl. p
    # the r-th unassigned slot is the number of slots p with seen[p] <= r
    un_slot = jnp.sum(seen[:, None, :] <= rank[:, :, None], axis=-1, dtype=jnp.int32)
    n_un = seen[:, -1]
    ok = has_owned | (rank < n_un[:, None])
    slot = jnp.where(has_owned, owned_slot, jnp.minimum(un_slot, cache.capacity - 1))
    return slot, ok


def write_token_pooled(cache: PooledLayerCache, k: Float[Array, "b hk d"], v: Float[Array, "b hk d"],
                       pos: Int[Array, " b"], slot: Int[Array, "b hk"], active: Bool[Array, " b"],
                       score: float | Float[Array, ""] | Float[Array, "b hk"] = 0.0) -> PooledLayerCache:
    """Writes one token per (row, KV head) into pool slot[b, h] and marks it owned by h.

    k, v: [B, Hkv, D]; pos: i32[B]; slot: i32[B, Hkv] (distinct per row); active: bool[B]
    (inactive rows untouched); score: scalar or f32[B, Hkv].
    """
    b, hk = slot.shape
    bi = jnp.arange(b)[:, None]
    si = jnp.where(active[:, None], slot, cache.capacity)  # out of range -> dropped
    pos_bh = jnp.broadcast_to(pos[:, None], (b, hk)).astype(jnp.int32)
    head_bh = jnp.broadcast_to(jnp.arange(hk, dtype=jnp.int32)[None, :], (b, hk))
    sc = jnp.broadcast_to(jnp.asarray(score, jnp.float32), (b, hk))
    return cache.replace(
        k=cache.k.at[bi, si].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[bi, si].set(v.astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[bi, si].set(pos_bh, mode="drop"),
        head=cache.head.at[bi, si].set(head_bh, mode="drop"),
        score=cache.score.at[bi, si].set(sc, mode="drop"),
    )


def pooled_decode_attention(q: Float[Array, "b h d"], cache: PooledLayerCache, q_pos: Int[Array, " b"], *,
                            sliding_window: int | None = None,
                            group_reduce: str = "mean") -> tuple[Float[Array, "b h d"], Float32[Array, "b p"]]:
    """One query per row over a pool -> (out [B, H, D] in q's dtype, mass f32[B, P]).

    q: [B, H, D] (after RoPE); q_pos: i32[B]. Query head j attends over the slots owned by KV head
    j // G only; mass[b, p] is slot p's probability reduced (`group_reduce`) over the G query heads
    of its owner, 0 for empty slots. With static segments each head reads only its own range;
    otherwise every slot is scored for every query head and masked by owner (exact, but
    Hkv times the multiply-adds of a uniform cache of the same size).
    """
    b, h, d = q.shape
    hk = cache.num_kv_heads
    g = h // hk
    if cache.segments is not None:
        outs, masses = [], []
        for i, (s, e) in enumerate(cache.segments):
            o, m = reference.decode_attention(q[:, i * g:(i + 1) * g], cache.k[:, None, s:e], cache.v[:, None, s:e],
                                              cache.pos[:, None, s:e], q_pos, sliding_window=sliding_window,
                                              group_reduce=group_reduce)
            outs.append(o)
            masses.append(m[:, 0])
        return jnp.concatenate(outs, axis=1), jnp.concatenate(masses, axis=-1)
    qg = q.reshape(b, hk, g, d)
    logits = jnp.einsum("bhgd,bpd->bhgp", qg, cache.k, preferred_element_type=jnp.float32) * d ** -0.5
    mine = cache.head[:, None, None, :] == jnp.arange(hk, dtype=jnp.int32)[None, :, None, None]
    mask = mine & reference.visible(q_pos[:, None, None, None], cache.pos[:, None, None, :], sliding_window)
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, reference.NEG_INF), axis=-1), 0.0)
    out = jnp.einsum("bhgp,bpd->bhgd", probs.astype(cache.v.dtype), cache.v, preferred_element_type=jnp.float32)
    mass = jnp.sum(reference.reduce_group(probs, group_reduce, axis=2), axis=1)  # one owner per slot
    return out.reshape(b, h, d).astype(q.dtype), mass


__all__ = ["UNASSIGNED", "PooledLayerCache", "free_slots", "gather_prompt_pooled", "init_pooled_cache",
           "pooled_decode_attention", "segments_from_sizes", "write_token_pooled"]
