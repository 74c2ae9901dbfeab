"""KIVI-style asymmetric min-max quantization primitives (Liu et al., 2024).

Keys are quantized per channel over groups of G consecutive tokens (key outliers live in fixed
channels); values per token over groups of G consecutive channels. Codes of `bits` in {2, 4, 8}
are packed along the last axis (two int4 or four int2 per byte). Scales and minimums are stored in
`scale_dtype`, and codes are computed from the *stored* (rounded) scale and minimum, so the
dequantization error of every element is at most half of its group's stored step.
"""

from __future__ import annotations

import jax.numpy as jnp

BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def pack(codes, bits: int):
    """uint8 codes [..., N] with values < 2**bits -> packed uint8 [..., N * bits // 8]."""
    check_bits(bits)
    if bits == 8:
        return codes.astype(jnp.uint8)
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"last axis ({n}) must be a multiple of {per} to pack {bits}-bit codes")
    c = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (n // per, per))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bit fields: sum == or


def unpack(packed, bits: int):
    """Inverse of `pack`: packed uint8 [..., M] -> uint8 codes [..., M * 8 // bits]."""
    check_bits(bits)
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    mask = jnp.uint8(2**bits - 1)
    c = (packed[..., None] >> shifts) & mask
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def _round_down(x, dtype):
    """x (f32) rounded to `dtype`, never above x."""
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) > x, jnp.nextafter(y, jnp.array(-jnp.inf, dtype)), y)


def _round_up(x, dtype):
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.array(jnp.inf, dtype)), y)


def minmax_quantize(x, bits: int, axis: int, scale_dtype=jnp.float16):
    """Quantizes groups along `axis` (reduced): returns (codes uint8 like x, scale, minimum) where
    scale/minimum keep `axis` with size 1. x is float; levels = 2**bits - 1."""
    levels = 2**bits - 1
    x32 = x.astype(jnp.float32)
    mn = _round_down(jnp.min(x32, axis=axis, keepdims=True), scale_dtype)
    mx = jnp.max(x32, axis=axis, keepdims=True)
    step = (mx - mn.astype(jnp.float32)) / levels
    step = jnp.where(step > 0, step, 1.0)  # constant group: any positive step reproduces it exactly
    scale = _round_up(step, scale_dtype)
    codes = jnp.clip(jnp.round((x32 - mn.astype(jnp.float32)) / scale.astype(jnp.float32)), 0, levels)
    return codes.astype(jnp.uint8), scale, mn


def dequantize(codes, scale, minimum, dtype=jnp.float32):
    return (codes.astype(jnp.float32) * scale.astype(jnp.float32) + minimum.astype(jnp.float32)).astype(dtype)


def quantize_keys(k, bits: int, group_size: int, scale_dtype=jnp.float16):
    """Per-channel key quantization over token groups.

    k: [..., T, D] with T a multiple of group_size -> (packed uint8 [..., T, D*bits/8],
    scale [..., T/G, D], minimum [..., T/G, D])."""
    *lead, t, d = k.shape
    if t % group_size:
        raise ValueError(f"token count {t} must be a multiple of group_size={group_size}")
    g = k.reshape(*lead, t // group_size, group_size, d)
    codes, scale, mn = minmax_quantize(g, bits, axis=-2, scale_dtype=scale_dtype)
    return pack(codes.reshape(*lead, t, d), bits), scale[..., 0, :], mn[..., 0, :]


def dequantize_keys(packed, scale, minimum, bits: int, group_size: int, dtype=jnp.float32):
    """Inverse of `quantize_keys` -> [..., T, D]."""
    codes = unpack(packed, bits)
    *lead, t, d = codes.shape
    g = codes.reshape(*lead, t // group_size, group_size, d)
    return dequantize(g, scale[..., None, :], minimum[..., None, :], dtype).reshape(*lead, t, d)


def quantize_values(v, bits: int, group_size: int, scale_dtype=jnp.float16):
    """Per-token value quantization over channel groups.

    v: [..., T, D] with D a multiple of group_size -> (packed uint8 [..., T, D*bits/8],
    scale [..., T, D/G], minimum [..., T, D/G])."""
    *lead, t, d = v.shape
    if d % group_size:
        raise ValueError(f"head dimension {d} must be a multiple of group_size={group_size}")
    g = v.reshape(*lead, t, d // group_size, group_size)
    codes, scale, mn = minmax_quantize(g, bits, axis=-1, scale_dtype=scale_dtype)
    return pack(codes.reshape(*lead, t, d), bits), scale[..., 0], mn[..., 0]


def dequantize_values(packed, scale, minimum, bits: int, group_size: int, dtype=jnp.float32):
    """Inverse of `quantize_values` -> [..., T, D]."""
    codes = unpack(packed, bits)
    *lead, t, d = codes.shape
    g = codes.reshape(*lead, t, d // group_size, group_size)
    return dequantize(g, scale[..., None], minimum[..., None], dtype).reshape(*lead, t, d)
