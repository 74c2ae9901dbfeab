# ruff: noqa: F722
# (jaxtyping shape strings such as "b h d" are not forward references)
"""Quantize-and-pack of new tokens into a KIVI cache: keys per channel over groups of G tokens,
values per token over groups of G channels, in one kernel over the same tokens.

Reference: `pikv_jax.kernels.quant.quantize_keys` / `quantize_values` (`reference` below calls
both). The kernel reproduces them bit for bit on CPU (interpret mode): min and max rounded down /
up to the stored scale dtype (nextafter done on the bit pattern), codes from the stored scale and
minimum, round half to even, clip, then packing. On a GPU the f32 division may be approximate in
Triton, which could move a code by one at an exact rounding tie; scripts/bench_kernels.py reports
the fraction of identical codes and the worst dequantization error there.

Work per program: m <= 8 groups of G tokens ([m * G, D] of keys and of values). Packing (per =
8 / bits codes per byte): on GPU rounds of neighbour pairing (reshape + unstack, Triton's split);
on TPU a matmul of the codes with a 0/1 * 2^(bits * r) matrix, exact in f32, needing no lane
shuffles.
This runs once per G decode steps per layer (a ring flush) and once at prefill: it is not on the
bandwidth-critical path; its value is keeping the codes bit-identical across backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, UInt8

from pikv_jax.kernels import common, quant

# (kq, k_scale, k_min, vq, v_scale, v_min): codes packed along D (dp = D * bits / 8), key scales per
# group of G tokens (ng = T / G), value scales per group of G channels (nc = D / G)
Packed = tuple[UInt8[Array, "*lead t dp"], Float[Array, "*lead ng d"], Float[Array, "*lead ng d"],
               UInt8[Array, "*lead t dp"], Float[Array, "*lead t nc"], Float[Array, "*lead t nc"]]


def reference(k: Float[Array, "*lead t d"], v: Float[Array, "*lead t d"], bits: int, group_size: int,
              scale_dtype=jnp.float16) -> Packed:
    """KIVI quantize-and-pack by quant.quantize_keys (per channel over G tokens) and
    quant.quantize_values (per token over G channels)."""
    return (*quant.quantize_keys(k, bits, group_size, scale_dtype),
            *quant.quantize_values(v, bits, group_size, scale_dtype))


def _step(y, up: bool):
    """The next value of y's dtype towards +inf (up) or -inf, by integer arithmetic on the bits."""
    if jnp.dtype(y.dtype) == jnp.float32:
        return jnp.nextafter(y, jnp.full_like(y, jnp.inf if up else -jnp.inf))
    it = jnp.int16  # sign, zero and infinity read from the bits (comparisons may flush subnormals)
    bits = jax.lax.bitcast_convert_type(y, it)
    neg = bits < 0
    away = jnp.logical_not(neg) if up else neg  # moving away from zero: magnitude + 1
    nb = jnp.where(away, bits + it(1), bits - it(1))
    tiny = it(1) if up else it(-32767)  # +/- smallest subnormal (0x0001 / 0x8001)
    nb = jnp.where((bits & it(0x7FFF)) == 0, tiny, nb)
    inf = int(np.array(np.inf if up else -np.inf, y.dtype).view(np.int16))  # a Python constant, not a traced one
    nb = jnp.where(bits == it(inf), bits, nb)  # +inf stays +inf going up, -inf going down
    return jax.lax.bitcast_convert_type(nb, y.dtype)


def _round_down(x, dtype):
    y = x.astype(dtype)
    return y if jnp.dtype(dtype) == jnp.float32 else jnp.where(y.astype(jnp.float32) > x, _step(y, False), y)


def _round_up(x, dtype):
    y = x.astype(dtype)
    return y if jnp.dtype(dtype) == jnp.float32 else jnp.where(y.astype(jnp.float32) < x, _step(y, True), y)


def _round_half_even(x):
    f = jnp.floor(x)
    d = x - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
    return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


def _scale_min(mn32, mx32, levels: int, sd):
    """(scale, minimum) in the stored dtype from f32 group extremes, as quant.minmax_quantize."""
    mn = _round_down(mn32, sd)
    step = (mx32 - mn.astype(jnp.float32)) / levels
    step = jnp.where(step > 0, step, 1.0)
    return _round_up(step, sd), mn


def _codes(x, mn, scale, levels: int):
    return jnp.clip(_round_half_even((x - mn.astype(jnp.float32)) / scale.astype(jnp.float32)), 0, levels)


def _pack(codes, bits: int, backend: str):
    """f32 codes [N, D] -> u8 [N, D * bits / 8] (code of channel per * j + r in bits r * bits of byte j).

    Triton: rounds of pairing neighbours (reshape [N, M / 2, 2] + unstack: a join-free split). TPU: an
    exact matmul with 0/1 * 2^(bits * r) weights (no lane shuffles on the VPU)."""
    if bits == 8:
        return codes.astype(jnp.int32).astype(jnp.uint8)
    per = 8 // bits
    n, d = codes.shape
    if backend == "triton":
        x = codes.astype(jnp.int32)
        shift = bits
        while x.shape[1] > d // per:
            lo, hi = jnp.unstack(x.reshape(n, x.shape[1] // 2, 2), axis=-1)
            x = lo | (hi << shift)
            shift *= 2
        return x.astype(jnp.uint8)
    c = jax.lax.broadcasted_iota(jnp.int32, (d, d // per), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (d, d // per), 1)
    w = jnp.where(c // per == j, jnp.left_shift(1, bits * (c % per)), 0).astype(jnp.float32)
    packed = jnp.dot(codes, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return packed.astype(jnp.int32).astype(jnp.uint8)


def _kernel(k_ref, v_ref, kq_ref, ks_ref, km_ref, vq_ref, vs_ref, vm_ref, *, bits: int, g: int, m: int, sd,
            backend: str):
    levels = 2 ** bits - 1
    f32 = jnp.float32
    d = k_ref.shape[-1]
    # keys: per channel over each group of g tokens
    for i in range(m):
        x = k_ref[pl.ds(i * g, g), :].astype(f32)  # [g, D]
        scale, mn = _scale_min(jnp.min(x, axis=0, keepdims=True), jnp.max(x, axis=0, keepdims=True), levels, sd)
        kq_ref[pl.ds(i * g, g), :] = _pack(_codes(x, mn, scale, levels), bits, backend)
        ks_ref[pl.ds(i, 1), :] = scale
        km_ref[pl.ds(i, 1), :] = mn
    # values: per token over each group of g channels (selects, no lane reshapes)
    x = v_ref[...].astype(f32)  # [m * g, D]
    rows = x.shape[0]
    lane_group = jax.lax.broadcasted_iota(jnp.int32, (1, d), 1) // g
    out_group = jax.lax.broadcasted_iota(jnp.int32, (rows, d // g), 1)
    sc_b = jnp.ones((rows, d), sd)
    mn_b = jnp.zeros((rows, d), sd)
    sc_o = jnp.ones((rows, d // g), sd)
    mn_o = jnp.zeros((rows, d // g), sd)
    for a in range(d // g):
        sel = lane_group == a
        lo = jnp.min(jnp.where(sel, x, jnp.inf), axis=1, keepdims=True)
        hi = jnp.max(jnp.where(sel, x, -jnp.inf), axis=1, keepdims=True)
        scale, mn = _scale_min(lo, hi, levels, sd)  # [rows, 1]
        sc_b, mn_b = jnp.where(sel, scale, sc_b), jnp.where(sel, mn, mn_b)
        sc_o, mn_o = jnp.where(out_group == a, scale, sc_o), jnp.where(out_group == a, mn, mn_o)
    vq_ref[...] = _pack(_codes(x, mn_b, sc_b, levels), bits, backend)
    vs_ref[...] = sc_o
    vm_ref[...] = mn_o


def unsupported_reason(k, v, bits: int, group_size: int, scale_dtype, backend: str) -> str | None:
    """None when the kernel handles these inputs, else the rule they break."""
    t, d = k.shape[-2:]
    if k.shape != v.shape:
        return f"k {k.shape} and v {v.shape} differ"
    if t % group_size or d % group_size:
        return f"tokens {t} and head_dim {d} must be multiples of group_size {group_size}"
    if d * bits % 8:
        return f"head_dim {d} cannot be packed at {bits} bits"
    sd = jnp.dtype(scale_dtype)
    if sd not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"scale_dtype {sd} (allowed: float16, bfloat16, float32)"
    if backend == "triton" and not (common.is_pow2(d) and common.is_pow2(group_size) and d >= 16):
        return f"head_dim {d} and group_size {group_size} must be powers of two (head_dim >= 16) for Triton tiles"
    if backend == "mosaic_tpu" and sd == jnp.dtype(jnp.float16):
        return "float16 scales are not supported on TPU (use bfloat16 or float32)"
    return None


def quantize_kv(k: Float[Array, "*lead t d"], v: Float[Array, "*lead t d"], bits: int, group_size: int,
                scale_dtype=jnp.float16, *, backend: str | None = None, interpret: bool | None = None) -> Packed:
    """Kernel version of `reference` (bit-identical results)."""
    quant.check_bits(bits)
    backend, interpret = common.resolve_backend(backend, interpret)
    reason = unsupported_reason(k, v, bits, group_size, scale_dtype, backend)
    if reason:
        raise common.KernelUnsupported(f"quantize-and-pack: {reason}")
    *lead, t, d = k.shape
    n = 1
    for s in lead:
        n *= s
    g = group_size
    groups = t // g
    m = min(8, groups)
    if backend == "triton":
        m = 1 << (m.bit_length() - 1)  # a power of two
    sd = jnp.dtype(scale_dtype)
    dp = d * bits // 8
    spec = lambda rows, cols: pl.BlockSpec((None, rows, cols), lambda i, j: (i, j, 0))
    kernel = functools.partial(_kernel, bits=bits, g=g, m=m, sd=sd, backend=backend)
    kq, ks, km, vq, vs, vm = pl.pallas_call(
        kernel,
        grid=(n, common.cdiv(groups, m)),
        in_specs=[spec(m * g, d), spec(m * g, d)],
        out_specs=[spec(m * g, dp), spec(m, d), spec(m, d), spec(m * g, dp), spec(m * g, d // g), spec(m * g, d // g)],
        out_shape=[jax.ShapeDtypeStruct((n, t, dp), jnp.uint8), jax.ShapeDtypeStruct((n, groups, d), sd),
                   jax.ShapeDtypeStruct((n, groups, d), sd), jax.ShapeDtypeStruct((n, t, dp), jnp.uint8),
                   jax.ShapeDtypeStruct((n, t, d // g), sd), jax.ShapeDtypeStruct((n, t, d // g), sd)],
        compiler_params=common.compiler_params(backend, interpret, num_warps=4, num_stages=1,
                                               dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_arg(backend, interpret),
        name="pikv_quantize_pack",
    )(k.reshape(n, t, d), v.reshape(n, t, d))
    r = lambda x, *tail: x.reshape(*lead, *tail)
    return r(kq, t, dp), r(ks, groups, d), r(km, groups, d), r(vq, t, dp), r(vs, t, d // g), r(vm, t, d // g)
