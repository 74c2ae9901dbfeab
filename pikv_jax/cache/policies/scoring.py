"""Scoring helpers shared by policies: attention of the last w prompt queries (observation window),
1-D pooling of scores, key norms, and a lexicographic argmin for tie-broken eviction."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pikv_jax.attention.reference import NEG_INF, reduce_group, visible
from pikv_jax.cache.policies.base import PrefillContext


def window_probs(ctx: PrefillContext, w: int, group_reduce: str = "mean"):
    """Softmax attention of each row's last `w` real prompt queries over its prompt keys.

    Returns (probs f32[B, Hkv, w, S] reduced over each GQA group, q_pos i32[B, w]); window slots
    before the row's start (rows shorter than w) have q_pos -1 and all-zero probabilities. Causal
    inside the window: query i sees keys up to its own position.
    """
    b, s, h, d = ctx.q.shape
    hk = ctx.k.shape[2]
    w = min(w, s)
    q_idx = ctx.lengths[:, None] - w + jnp.arange(w)[None, :]  # [B, w]
    q_pos = jnp.where(q_idx >= 0, q_idx, -1).astype(jnp.int32)
    q = jnp.take_along_axis(ctx.q, jnp.maximum(q_idx, 0)[:, :, None, None], axis=1)  # [B, w, H, D]
    q = q.reshape(b, w, hk, h // hk, d)
    logits = jnp.einsum("bwhgd,bshd->bhgws", q, ctx.k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, None, :, None], ctx.pos[:, None, None, None, :], None)
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
    return reduce_group(probs, group_reduce, axis=2), q_pos


def avg_pool(x, kernel: int):
    """Average pooling along the last axis, stride 1, zero padding of kernel // 2 on each side,
    divided by `kernel` (PyTorch avg_pool1d with count_include_pad, as SnapKV uses)."""
    if kernel <= 1:
        return x
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    pad = kernel // 2
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    c = jnp.cumsum(xp, axis=-1)
    c = jnp.pad(c, [(0, 0)] * (x.ndim - 1) + [(1, 0)])
    n = x.shape[-1]
    return (c[..., kernel: kernel + n] - c[..., :n]) / kernel


def max_pool(x, kernel: int):
    """Max pooling along the last axis, stride 1, padding kernel // 2 (padding never wins)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,),
                                 (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])


def key_norms(k):
    """L2 norm over the head dimension in float32: [..., D] -> [...]."""
    k32 = k.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(k32 * k32, axis=-1))


def heads_first(x):
    """[B, S, Hkv] -> [B, Hkv, S]."""
    return jnp.swapaxes(x, 1, 2)


def lexicographic_argmin(primary, secondary):
    """Index of the minimum of `primary` along the last axis, ties broken by the smallest `secondary`."""
    best = jnp.min(primary, axis=-1, keepdims=True)
    tied = primary == best
    big = jnp.iinfo(jnp.int32).max
    return jnp.argmin(jnp.where(tied, secondary, big), axis=-1).astype(jnp.int32)
