"""`QuantizedCompressor`: KIVI quantization with the seed's standalone call shape, and its cache
policy for generation (pikv_jax/compress/kivi.py holds the cache layout)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from pikv_jax.attention import reference
from pikv_jax.cache.state import static_field
from pikv_jax.compress.base import CACHE_LAYOUT, CompressedKV, KVCompressor, Layout, check_hidden_size
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.intmath import round_up
from pikv_jax.kernels import quant


@struct.dataclass
class QuantizedKV(CompressedKV):
    """The oldest Sq tokens quantized (Sq a multiple of G), the newest S - Sq in full precision.

    kq, vq: u8[B, Hkv, Sq, D*bits/8]; k_scale, k_min: [B, Hkv, Sq/G, D]; v_scale, v_min:
    [B, Hkv, Sq, D/G]; k_res, v_res: [B, Hkv, S - Sq, D] (the input dtype); layout: the caller's
    (unpacking yields the dequantized tokens followed by the residual ones)."""

    kq: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    vq: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    bits: int = static_field(default=4)
    group_size: int = static_field(default=32)
    layout: Layout = static_field(default=CACHE_LAYOUT)

    def decompress(self):
        k = quant.dequantize_keys(self.kq, self.k_scale, self.k_min, self.bits, self.group_size)
        v = quant.dequantize_values(self.vq, self.v_scale, self.v_min, self.bits, self.group_size)
        return (jnp.concatenate([k, self.k_res.astype(jnp.float32)], axis=2),
                jnp.concatenate([v, self.v_res.astype(jnp.float32)], axis=2))

    def attend(self, q):
        k, v = self.decompress()
        pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), k.shape[:3])
        out, _ = reference.decode_attention(q.astype(jnp.float32), k, v, pos, jnp.full((q.shape[0],), k.shape[2]))
        return out


class QuantizedCompressor(KVCompressor):
    """KIVI asymmetric min-max quantization: keys per channel over groups of `group_size` tokens,
    values per token over groups of `group_size` channels, `bits` in {2, 4, 8} packed, the newest
    `residual_length` tokens (a multiple of group_size) kept in full precision; defaults as
    QuantizedPolicy's (G = 32, or 64 at 8 bits; R = 64). scale_dtype:
    storage of scales/minimums (float16 as in KIVI). hidden_size (optional, seed-style): the
    per-token width K/V must have (any layout of pikv_jax/compress/base.py, heads kept as given;
    group_size must divide the head width)."""

    name = "quantized"

    def __init__(self, bits: int = 8, group_size: int | None = None, residual_length: int = 64,
                 scale_dtype=jnp.float16, *, hidden_size: int | None = None):
        super().__init__()
        self.hidden_size = check_hidden_size(hidden_size)
        # QuantizedPolicy validates bits, group_size and residual_length with clear messages
        self._policy = QuantizedPolicy(bits=bits, group_size=group_size, residual_length=residual_length,
                                       scale_dtype=scale_dtype)
        self.bits, self.group_size = bits, self._policy.group_size
        self.residual_length, self.scale_dtype = residual_length, scale_dtype
        self.name = f"int{bits}"

    def compress(self, keys, values, importance=None) -> QuantizedKV:
        self._policy.check_head_dim(keys.shape[-1])
        g, r = self.group_size, self.residual_length
        s = keys.shape[2]
        sq = round_up(max(s - r, 0), g)
        kq, ks, km = quant.quantize_keys(keys[:, :, :sq], self.bits, g, self.scale_dtype)
        vq, vs, vm = quant.quantize_values(values[:, :, :sq], self.bits, g, self.scale_dtype)
        return QuantizedKV(kq=kq, k_scale=ks, k_min=km, vq=vq, v_scale=vs, v_min=vm, k_res=keys[:, :, sq:],
                           v_res=values[:, :, sq:], bits=self.bits, group_size=g)

    def as_policy(self, inner=None) -> QuantizedPolicy:
        return self._policy if inner is None else dataclasses.replace(self._policy, inner=inner)
