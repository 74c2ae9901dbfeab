# ruff: noqa: F722
# (jaxtyping shape strings such as "b h d" are not forward references)
"""Split-K decode attention in plain jnp: one segment of slots -> unnormalised (out, max, sum-exp)
partials, merged with other segments by `common.finish` (log-sum-exp, flash-decoding style).

Why: a cache whose slots live in separate arrays (KIVI's quantized groups and its full-precision
ring) would otherwise be concatenated before the softmax. Under a `seq` mesh axis the quantized
part is split over devices and the ring is not, so the concatenated [Cq + R] axis has to be
redistributed at every step (an all-to-all of the whole dequantized cache). Attending each segment
where it lives and merging the statistics leaves XLA only reductions of [B, H] and [B, H, D]
partials to move across devices. The Pallas kernels produce the same `Partials` per segment.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.kernels.common import Partials


def segment_partials(q: Float[Array, "b h d"], k: Float[Array, "b hk n d"], v: Float[Array, "b hk n d"],
                     pos: Int[Array, "b hk n"], q_pos: Int[Array, " b"] | Int[Array, "b hk"], *,
                     sliding_window: int | None = None) -> Partials:
    """One query per row over N slots in f32 -> Partials with one split: o f32[B, Hkv, 1, G, D],
    m, l f32[B, Hkv, 1, G] (m is NEG_INF, l is 0 when nothing is visible), logits f32[B, Hkv, G, N]
    (-inf where invisible) and limit N (every slot in range)."""
    b, h, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    f32 = jnp.float32
    qg = q.reshape(b, hk, h // hk, d).astype(f32)
    logits = jnp.einsum("bhgd,bhnd->bhgn", qg, k.astype(f32), preferred_element_type=f32) * d ** -0.5
    qp = q_pos[:, None, None, None] if q_pos.ndim == 1 else q_pos[:, :, None, None]
    mask = visible(qp, pos[:, :, None, :], sliding_window)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(jnp.where(mask, logits, NEG_INF), axis=-1)  # [B, Hkv, G]
    p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, v.astype(f32), preferred_element_type=f32)
    limit = jnp.full((b, hk), n, jnp.int32)
    return Partials(o[:, :, None], m[:, :, None], jnp.sum(p, axis=-1)[:, :, None], logits, limit)


__all__ = ["segment_partials"]
