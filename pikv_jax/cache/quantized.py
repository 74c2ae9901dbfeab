"""KIVI quantized layer cache: packed key/value codes in groups, their scales and minimums, and a
full-precision residual ring of the newest tokens (Liu et al., 2024). The layout only; the policy
that writes and evicts it is `pikv_jax.compress.kivi.QuantizedPolicy`."""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b hk c d" are not forward references)

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int32, UInt8

from pikv_jax.cache.state import EMPTY, PerHeadSlotCache, pytree_dataclass, static_field
from pikv_jax.kernels import quant


@pytree_dataclass
class QuantizedLayerCache(PerHeadSlotCache):
    """KIVI layout (pikv_jax/compress/kivi.py has the policy that fills it).

    kq, vq: u8[B, Hkv, Cq, D*bits/8]; k_scale, k_min: [B, Hkv, Cq/G, D]; v_scale, v_min:
    [B, Hkv, Cq, D/G]; k_res, v_res: [B, Hkv, R, D]; pos, score: [B, Hkv, Cq + R] (quantized slots
    first, then the ring); ring_start, ring_count: i32[B, Hkv]. In the annotations pb = D*bits/8,
    ng = Cq/G (key groups along tokens), nv = D/G (value groups along channels)."""

    kq: UInt8[Array, "b hk cq pb"]
    k_scale: Float[Array, "b hk ng d"]
    k_min: Float[Array, "b hk ng d"]
    vq: UInt8[Array, "b hk cq pb"]
    v_scale: Float[Array, "b hk cq nv"]
    v_min: Float[Array, "b hk cq nv"]
    k_res: Float[Array, "b hk r d"]
    v_res: Float[Array, "b hk r d"]
    pos: Int32[Array, "b hk cq+r"]
    score: Float[Array, "b hk cq+r"]
    ring_start: Int32[Array, "b hk"]
    ring_count: Int32[Array, "b hk"]
    extra: dict[str, Any] = struct.field(default_factory=dict)
    bits: int = static_field(default=4)
    group_size: int = static_field(default=32)

    head_dim_field: ClassVar[str] = "k_res"

    @property
    def quantized_slots(self) -> int:
        return self.kq.shape[2]

    @property
    def residual_slots(self) -> int:
        return self.k_res.shape[2]

    def dense_kv(self, dtype=jnp.float32):
        """Dequantized keys and values [B, Hkv, Cq + R, D] aligned with `pos`."""
        k = quant.dequantize_keys(self.kq, self.k_scale, self.k_min, self.bits, self.group_size, dtype)
        v = quant.dequantize_values(self.vq, self.v_scale, self.v_min, self.bits, self.group_size, dtype)
        return (jnp.concatenate([k, self.k_res.astype(dtype)], axis=2),
                jnp.concatenate([v, self.v_res.astype(dtype)], axis=2))


def init_quantized_layer(batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype, *, bits: int,
                         group_size: int, residual_length: int, scale_dtype) -> QuantizedLayerCache:
    """Empty cache holding at least `capacity` tokens: R ring slots plus ceil((C - R) / G) groups."""
    g, r = group_size, residual_length
    cq = max(0, -(-(capacity - r) // g) * g)
    shape = (batch, num_kv_heads)
    pb = head_dim * bits // 8
    return QuantizedLayerCache(
        kq=jnp.zeros(shape + (cq, pb), jnp.uint8),
        k_scale=jnp.ones(shape + (cq // g, head_dim), scale_dtype),
        k_min=jnp.zeros(shape + (cq // g, head_dim), scale_dtype),
        vq=jnp.zeros(shape + (cq, pb), jnp.uint8),
        v_scale=jnp.ones(shape + (cq, head_dim // g), scale_dtype),
        v_min=jnp.zeros(shape + (cq, head_dim // g), scale_dtype),
        k_res=jnp.zeros(shape + (r, head_dim), dtype),
        v_res=jnp.zeros(shape + (r, head_dim), dtype),
        pos=jnp.full(shape + (cq + r,), EMPTY, jnp.int32),
        score=jnp.zeros(shape + (cq + r,), jnp.float32),
        ring_start=jnp.zeros(shape, jnp.int32),
        ring_count=jnp.zeros(shape, jnp.int32),
        bits=bits, group_size=g)
