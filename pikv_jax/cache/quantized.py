"""KIVI quantized layer cache: packed key/value codes in groups, their scales and minimums, and a
full-precision residual ring of the newest tokens (Liu et al., 2024). The layout only; the policy
that writes and evicts it is `pikv_jax.compress.kivi.QuantizedPolicy`.

Bytes per slot and KV head (SmolLM2: D = 64, G = 32, float16 scales and minimums), against 2 * D * 2
= 256 for bf16 keys and values: codes 2 * D * bits / 8 (int4: 64, int8: 128, int2: 32); value
scales and minimums 2 * 2 * D / G = 8; key scales and minimums 2 * 2 * D / G = 8 (one row of D per
group of G tokens). Everything else is kept off the per-slot budget:
- the ring holds at most R tokens in `ring_dtype` (bfloat16 by default, whatever the model's dtype);
- positions: ring slots have their own (`ring_pos`); quantized slots store theirs (`qpos`, int32)
  only when an eviction or prompt selection makes them arbitrary. A cache whose policy keeps every
  token in order (`implicit_positions`) stores none: quantized slot i holds position i for
  i < q_count;
- scores: stored only for policies whose eviction reads them (`score` is [B, Hkv, 0] otherwise).
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b hk c d" are not forward references)

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int32, UInt8

from pikv_jax.cache.state import EMPTY, PerHeadSlotCache, pytree_dataclass, static_field
from pikv_jax.kernels import quant


@pytree_dataclass
class QuantizedLayerCache(PerHeadSlotCache):
    """KIVI layout (pikv_jax/compress/kivi.py has the policy that fills it).

    kq, vq: u8[B, Hkv, Cq, D*bits/8]; k_scale, k_min: [B, Hkv, Cq/G, D]; v_scale, v_min:
    [B, Hkv, Cq, D/G]; k_res, v_res: [B, Hkv, R, D] (the ring, in its own dtype); ring_pos:
    i32[B, Hkv, R]; qpos: i32[B, Hkv, Cq] (i32[B, Hkv, 0] with `implicit_positions`); score:
    f32[B, Hkv, Cq + R] or f32[B, Hkv, 0] when not stored; q_count: i32[B, Hkv] quantized tokens
    resident; ring_start, ring_count: i32[B, Hkv]. `pos` (i32[B, Hkv, Cq + R], quantized slots
    first, then the ring) is derived. In the annotations pb = D*bits/8, ng = Cq/G (key groups
    along tokens), nv = D/G (value groups along channels)."""

    kq: UInt8[Array, "b hk cq pb"]
    k_scale: Float[Array, "b hk ng d"]
    k_min: Float[Array, "b hk ng d"]
    vq: UInt8[Array, "b hk cq pb"]
    v_scale: Float[Array, "b hk cq nv"]
    v_min: Float[Array, "b hk cq nv"]
    k_res: Float[Array, "b hk r d"]
    v_res: Float[Array, "b hk r d"]
    ring_pos: Int32[Array, "b hk r"]
    qpos: Int32[Array, "b hk cq"] | Int32[Array, "b hk 0"]
    score: Float[Array, "b hk cq+r"] | Float[Array, "b hk 0"]
    q_count: Int32[Array, "b hk"]
    ring_start: Int32[Array, "b hk"]
    ring_count: Int32[Array, "b hk"]
    extra: dict[str, Any] = struct.field(default_factory=dict)
    bits: int = static_field(default=4)
    group_size: int = static_field(default=32)
    implicit_positions: bool = static_field(default=False)

    head_dim_field: ClassVar[str] = "k_res"

    @property
    def quantized_slots(self) -> int:
        return self.kq.shape[2]

    @property
    def residual_slots(self) -> int:
        return self.k_res.shape[2]

    @property
    def batch(self) -> int:
        return self.ring_pos.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.ring_pos.shape[1]

    @property
    def capacity(self) -> int:
        return self.quantized_slots + self.residual_slots

    @property
    def has_scores(self) -> bool:
        return self.score.shape[2] == self.capacity

    @property
    def quantized_pos(self) -> jax.Array:
        """i32[B, Hkv, Cq]: positions of the quantized slots (-1 = empty)."""
        if not self.implicit_positions:
            return self.qpos
        slot = jnp.arange(self.quantized_slots, dtype=jnp.int32)
        return jnp.where(slot < self.q_count[..., None], slot, EMPTY)

    @property
    def pos(self) -> jax.Array | jax.ShapeDtypeStruct:
        """i32[B, Hkv, Cq + R]: every slot's position, quantized slots first (-1 = empty); a
        ShapeDtypeStruct for a cache from jax.eval_shape."""
        if isinstance(self.ring_pos, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(self.ring_pos.shape[:2] + (self.capacity,), jnp.int32)
        return jnp.concatenate([self.quantized_pos, self.ring_pos], axis=2)

    def dense_kv(self, dtype=jnp.float32):
        """Dequantized keys and values [B, Hkv, Cq + R, D] aligned with `pos`."""
        k = quant.dequantize_keys(self.kq, self.k_scale, self.k_min, self.bits, self.group_size, dtype)
        v = quant.dequantize_values(self.vq, self.v_scale, self.v_min, self.bits, self.group_size, dtype)
        return (jnp.concatenate([k, self.k_res.astype(dtype)], axis=2),
                jnp.concatenate([v, self.v_res.astype(dtype)], axis=2))


def _replace(self: QuantizedLayerCache, **updates) -> QuantizedLayerCache:
    """dataclasses.replace, also taking `pos` [B, Hkv, Cq + R]: split into the ring's positions and
    the quantized ones (with implicit positions, their count: the quantized part must be 0, 1, ...)."""
    if "pos" in updates:
        pos, cq = updates.pop("pos"), self.quantized_slots
        updates["ring_pos"] = pos[:, :, cq:]
        if self.implicit_positions:
            updates["q_count"] = jnp.sum(pos[:, :, :cq] >= 0, axis=-1).astype(jnp.int32)
        else:
            updates["qpos"] = pos[:, :, :cq]
    return dataclasses.replace(self, **updates)


QuantizedLayerCache.replace = _replace  # after pytree_dataclass, which installs the plain replace


def quantized_layout(capacity: int, group_size: int, residual_length: int) -> tuple[int, int]:
    """(Cq, R) for a cache of `capacity` tokens: a capacity within the ring is a ring of `capacity`
    full-precision slots and no quantized groups; otherwise R ring slots plus ceil((C - R) / G) groups."""
    if capacity <= residual_length:
        return 0, capacity
    return -(-(capacity - residual_length) // group_size) * group_size, residual_length


def init_quantized_layer(batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype, *, bits: int,
                         group_size: int, residual_length: int, scale_dtype, ring_dtype=None,
                         implicit_positions: bool = False, scores: bool = True) -> QuantizedLayerCache:
    """Empty cache holding at least `capacity` tokens (see `quantized_layout`). ring_dtype: the
    ring's storage (None = `dtype`); implicit_positions: quantized slots hold positions 0, 1, ...
    in order, so none are stored; scores: store a per-slot score."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    g = group_size
    cq, r = quantized_layout(capacity, g, residual_length)
    shape = (batch, num_kv_heads)
    pb = head_dim * bits // 8
    ring_dtype = dtype if ring_dtype is None else ring_dtype
    return QuantizedLayerCache(
        kq=jnp.zeros(shape + (cq, pb), jnp.uint8),
        k_scale=jnp.ones(shape + (cq // g, head_dim), scale_dtype),
        k_min=jnp.zeros(shape + (cq // g, head_dim), scale_dtype),
        vq=jnp.zeros(shape + (cq, pb), jnp.uint8),
        v_scale=jnp.ones(shape + (cq, head_dim // g), scale_dtype),
        v_min=jnp.zeros(shape + (cq, head_dim // g), scale_dtype),
        k_res=jnp.zeros(shape + (r, head_dim), ring_dtype),
        v_res=jnp.zeros(shape + (r, head_dim), ring_dtype),
        ring_pos=jnp.full(shape + (r,), EMPTY, jnp.int32),
        qpos=jnp.full(shape + (0 if implicit_positions else cq,), EMPTY, jnp.int32),
        score=jnp.zeros(shape + (cq + r if scores else 0,), jnp.float32),
        q_count=jnp.zeros(shape, jnp.int32),
        ring_start=jnp.zeros(shape, jnp.int32),
        ring_count=jnp.zeros(shape, jnp.int32),
        bits=bits, group_size=g, implicit_positions=implicit_positions)
