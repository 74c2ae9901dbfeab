"""Primitive cache operations shared by every policy: write a prompt, gather a kept subset, find a
free slot, write one decoded token into chosen slots. All are O(C) or O(S) and shape-static."""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b s hk d" are not forward references)

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Int32

from pikv_jax.cache.state import EMPTY, LayerCache


def _heads_first(x):
    """[B, S, Hkv, D] -> [B, Hkv, S, D]."""
    return jnp.swapaxes(x, 1, 2)


def write_prompt(cache: LayerCache, k: Float[Array, "b s hk d"], v: Float[Array, "b s hk d"], pos: Int[Array, "b s"],
                 score: Float[Array, "b hk s"] | None = None) -> LayerCache:
    """Writes all S prompt tokens into slots [0, S) of an empty cache.

    k, v: [B, S, Hkv, D]; pos: i32[B, S] (-1 for padding); score: optional f32[B, Hkv, S].
    """
    b, s, hk, _ = k.shape
    if s > cache.capacity:
        raise ValueError(f"prompt of {s} tokens does not fit a cache of capacity {cache.capacity}")
    pos_h = jnp.broadcast_to(pos[:, None, :], (b, hk, s)).astype(jnp.int32)
    score = jnp.zeros((b, hk, s), jnp.float32) if score is None else score.astype(jnp.float32)
    upd = jax.lax.dynamic_update_slice
    return cache.replace(
        k=upd(cache.k, _heads_first(k).astype(cache.k.dtype), (0, 0, 0, 0)),
        v=upd(cache.v, _heads_first(v).astype(cache.v.dtype), (0, 0, 0, 0)),
        pos=upd(cache.pos, pos_h, (0, 0, 0)),
        score=upd(cache.score, jnp.where(pos_h >= 0, score, 0.0), (0, 0, 0)),
    )


def gather_prompt(cache: LayerCache, k: Float[Array, "b s hk d"], v: Float[Array, "b s hk d"], pos: Int[Array, "b s"],
                  keep_idx: Int[Array, "b hk kk"], keep_ok: Bool[Array, "b hk kk"],
                  score: Float[Array, "b hk s"] | None = None) -> LayerCache:
    """Writes a per-(row, head) subset of the prompt into slots [0, K) of an empty cache.

    keep_idx: i32[B, Hkv, K] prompt indices to keep; keep_ok: bool[B, Hkv, K] (False = leave empty,
    for rows with fewer valid tokens than K); score: optional f32[B, Hkv, S] carried into the cache.
    Kept entries are sorted by position so slot order stays chronological.
    """
    kk = keep_idx.shape[-1]
    if kk > cache.capacity:
        raise ValueError(f"keeping {kk} tokens does not fit a cache of capacity {cache.capacity}")
    b, s, hk, _ = k.shape
    pos_h = jnp.broadcast_to(pos[:, None, :], (b, hk, s)).astype(jnp.int32)
    kept_pos = jnp.take_along_axis(pos_h, keep_idx, axis=-1)
    kept_pos = jnp.where(keep_ok, kept_pos, EMPTY)
    # chronological order, empties last
    order = jnp.argsort(jnp.where(kept_pos >= 0, kept_pos, jnp.iinfo(jnp.int32).max), axis=-1)
    keep_idx = jnp.take_along_axis(keep_idx, order, axis=-1)
    kept_pos = jnp.take_along_axis(kept_pos, order, axis=-1)
    gather = lambda x: jnp.take_along_axis(_heads_first(x), keep_idx[..., None], axis=2)
    sc = jnp.zeros((b, hk, s), jnp.float32) if score is None else score.astype(jnp.float32)
    sc = jnp.where(kept_pos >= 0, jnp.take_along_axis(sc, keep_idx, axis=-1), 0.0)
    upd = jax.lax.dynamic_update_slice
    return cache.replace(
        k=upd(cache.k, gather(k).astype(cache.k.dtype), (0, 0, 0, 0)),
        v=upd(cache.v, gather(v).astype(cache.v.dtype), (0, 0, 0, 0)),
        pos=upd(cache.pos, kept_pos, (0, 0, 0)),
        score=upd(cache.score, sc, (0, 0, 0)),
    )


def first_free_slot(pos: Int[Array, "b hk c"]) -> tuple[Int32[Array, "b hk"], Bool[Array, "b hk"]]:
    """pos: i32[B, Hkv, C] -> (slot i32[B, Hkv], has_free bool[B, Hkv])."""
    free = pos < 0
    return jnp.argmax(free, axis=-1).astype(jnp.int32), jnp.any(free, axis=-1)


def write_token(cache: LayerCache, k: Float[Array, "b hk d"], v: Float[Array, "b hk d"], pos: Int[Array, " b"],
                slot: Int[Array, "b hk"], active: Bool[Array, " b"],
                score: float | Float[Array, ""] | Float[Array, "b hk"] = 0.0) -> LayerCache:
    """Writes one token per row into slot[b, h] of every KV head, in place (scatter).

    k, v: [B, Hkv, D]; pos: i32[B]; slot: i32[B, Hkv]; active: bool[B] (inactive rows untouched).
    """
    b, hk = slot.shape
    bi = jnp.arange(b)[:, None]
    hi = jnp.arange(hk)[None, :]
    si = jnp.where(active[:, None], slot, cache.capacity)  # out of range -> dropped
    pos_bh = jnp.broadcast_to(pos[:, None], (b, hk)).astype(jnp.int32)
    return cache.replace(
        k=cache.k.at[bi, hi, si].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[bi, hi, si].set(v.astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[bi, hi, si].set(pos_bh, mode="drop"),
        score=cache.score.at[bi, hi, si].set(jnp.broadcast_to(jnp.asarray(score, jnp.float32), (b, hk)),
                                             mode="drop"),
    )
