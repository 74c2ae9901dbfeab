"""Reference attention in plain jnp that also returns what cache scoring needs.

Two shapes of call:
- `chunk_attention`: T queries against S keys given with their positions (prefill, or a chunk
  appended to a cache). Causal by position, so it is exact for ragged, right-padded rows.
- `decode_attention`: one query per row against a cache laid out [B, Hkv, C, D] in arbitrary slot
  order, returning the per-slot attention mass reduced over each GQA group in the same pass.

Softmax runs in float32. A key is visible to a query when both are valid (position >= 0), the key
is not in the future, and (with a sliding window W) the key is among the last W positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pikv_jax.intmath import cdiv

NEG_INF = float(jnp.finfo(jnp.float32).min)
GROUP_REDUCTIONS = ("mean", "max", "sum")


def reduce_group(x, how: str, axis: int):
    """Reduces the query-head group axis of per-query-head scores (GQA)."""
    if how == "mean":
        return jnp.mean(x, axis=axis)
    if how == "max":
        return jnp.max(x, axis=axis)
    if how == "sum":
        return jnp.sum(x, axis=axis)
    raise ValueError(f"group_reduce={how!r} is not supported; allowed: {GROUP_REDUCTIONS}")


def visible(q_pos, k_pos, sliding_window: int | None):
    """bool mask: key at k_pos is visible from a query at q_pos (broadcasting)."""
    ok = (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos)
    if sliding_window is not None:
        ok &= k_pos > q_pos - sliding_window
    return ok


def _attend_block(q, k, v, q_pos, k_pos, mass_from, sliding_window, group_reduce):
    """q: [B, T, Hkv, G, D] against k, v: [B, S, Hkv, D] -> (out f32[B, T, Hkv, G, D], mass f32[B, Hkv, S] | None)."""
    d = q.shape[-1]
    logits = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, None, :, None], k_pos[:, None, None, None, :], sliding_window)
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)  # fully masked (padding) queries -> 0
    out = jnp.einsum("bhgts,bshd->bthgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    mass = None
    if mass_from is not None:
        counted = (q_pos >= mass_from[:, None])[:, None, None, :, None]
        mass = reduce_group(jnp.sum(jnp.where(counted, probs, 0.0), axis=3), group_reduce, axis=2)
    return out, mass


def chunk_attention(q, k, v, q_pos, k_pos, *, sliding_window: int | None = None, mass_from=None,
                    group_reduce: str = "mean", block_q: int = 256, causal_prefix: bool = False):
    """Attention of T queries over S keys.

    q: [B, T, H, D]; k, v: [B, S, Hkv, D]; q_pos: i32[B, T]; k_pos: i32[B, S] (-1 = padding).
    mass_from: optional i32[B]; when given, also returns key_mass f32[B, Hkv, S], the softmax
      probability each key received summed over the queries whose position is >= mass_from[b]
      (all queries: 0; SnapKV's observation window: length - w), reduced over each GQA group.
    causal_prefix: queries and keys are the same right-padded sequence (prefill), so query block i
      only needs keys [0, (i + 1) * block_q): the upper triangle of blocks is skipped (~2x less work).
    Queries go in blocks of `block_q`, so memory is O(block_q * S), never O(T * S).
    Returns (out [B, T, H, D] in q's dtype, key_mass or None).
    """
    b, t, h, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, hk, h // hk, d)
    block = functools.partial(_attend_block, mass_from=mass_from, sliding_window=sliding_window,
                              group_reduce=group_reduce)
    if t <= block_q:
        out, mass = block(qg, k, v, q_pos, k_pos)
        return out.reshape(b, t, h, d).astype(q.dtype), mass
    if causal_prefix:
        if t != s:
            raise ValueError(f"causal_prefix needs as many queries as keys, got {t} and {s}")
        outs, mass = [], jnp.zeros((b, hk, s), jnp.float32) if mass_from is not None else None
        for start in range(0, t, block_q):
            end = min(start + block_q, t)
            o, m = block(qg[:, start:end], k[:, :end], v[:, :end], q_pos[:, start:end], k_pos[:, :end])
            outs.append(o.astype(q.dtype))
            if m is not None:
                mass = mass.at[:, :, :end].add(m)
        return jnp.concatenate(outs, axis=1).reshape(b, t, h, d), mass
    nblocks = cdiv(t, block_q)
    pad = nblocks * block_q - t
    qb = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).reshape(b, nblocks, block_q, hk, h // hk, d)
    qpb = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nblocks, block_q)

    def step(mass, xs):
        o, m = block(xs[0], k, v, xs[1], k_pos)
        return (mass + m if m is not None else mass), o.astype(q.dtype)

    mass0 = jnp.zeros((b, hk, s), jnp.float32)
    mass, out = jax.lax.scan(step, mass0, (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(qpb, 1, 0)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nblocks * block_q, h, d)[:, :t]
    return out, (mass if mass_from is not None else None)


def decode_attention(q, k, v, k_pos, q_pos, *, sliding_window: int | None = None, group_reduce: str = "mean"):
    """One query per row over a slot-ordered cache.

    q: [B, H, D]; k, v: [B, Hkv, C, D]; k_pos: i32[B, Hkv, C] (-1 = empty); q_pos: i32[B] (or
    i32[B, Hkv] when positions are per head, as in caches that re-index positions).
    Returns out [B, H, D] (q's dtype) and mass f32[B, Hkv, C]: each slot's softmax probability,
    reduced over the G query heads that share its KV head. Empty slots get exactly 0.
    """
    b, h, d = q.shape
    hk = k.shape[1]
    qg = q.reshape(b, hk, h // hk, d)
    logits = jnp.einsum("bhgd,bhcd->bhgc", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    qp = q_pos[:, None, None, None] if q_pos.ndim == 1 else q_pos[:, :, None, None]
    mask = visible(qp, k_pos[:, :, None, :], sliding_window)
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhgc,bhcd->bhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, h, d).astype(q.dtype), reduce_group(probs, group_reduce, axis=2)
