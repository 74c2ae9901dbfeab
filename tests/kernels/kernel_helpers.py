"""Random inputs and error bounds shared by the kernel tests (fresh data per case, never zeros).

Error bounds (kernel in interpret mode against the pure-jnp reference, inputs ~ N(0, 1)):
- float32: out within 2e-5 absolute, mass within 2e-6: only summation order differs.
- bfloat16: out within 2.5e-2 absolute (the reference rounds normalised probabilities to bf16
  before P.V, the kernel rounds unnormalised ones, and the output is rounded to bf16: a few bf16
  ulps of values of magnitude ~1); mass within 2e-5 (logits are exact bf16 products summed in f32).
- KIVI int8 / int4 / int2 with float32 queries: as float32 (same dequantized values, f32 math).
- KIVI with bfloat16 queries: dequantized keys / values are rounded to bf16 in the kernel (the
  reference keeps them in f32): out within 4e-2, mass within 2e-3. Far below the quantization error
  itself (half a step: range / 30 for int4).
- quantize-and-pack: bit-identical codes, scales and minimums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.cache.quantized import init_quantized_layer
from pikv_jax.kernels import quant

TOL = {"float32": (2e-5, 2e-6), "bfloat16": (2.5e-2, 2e-5)}
QUANT_TOL = {"float32": (2e-5, 2e-6), "bfloat16": (4e-2, 2e-3)}


def ragged_positions(rng, batch: int, heads: int, capacity: int, fills, *, holes: bool = True):
    """i32[B, Hkv, C]: row b holds fills[b] tokens (positions 0..n-1, per-head order shuffled over the
    first n slots, some evicted to -1 when `holes`); the rest of the slots are empty."""
    pos = np.full((batch, heads, capacity), -1, np.int32)
    for b in range(batch):
        n = int(fills[b])
        for h in range(heads):
            perm = rng.permutation(n)
            pos[b, h, :n] = perm
            if holes and n > 4:
                drop = rng.choice(n, size=n // 5, replace=False)
                pos[b, h, drop] = -1
    return pos


def decode_case(seed: int, b: int, h: int, hk: int, c: int, d: int, dtype, *, fills=None, q_pos=None):
    """(q [B, H, D], k, v [B, Hkv, C, D], pos, q_pos i32[B]): ragged rows, arbitrary slot order,
    the last row inactive (q_pos = -1) when B > 2, and one query that cannot see its newest tokens."""
    rng = np.random.default_rng(seed)
    if fills is None:
        fills = [c, max(1, c // 3)] + [int(x) for x in rng.integers(0, c + 1, max(0, b - 2))]
    pos = ragged_positions(rng, b, hk, c, fills[:b])
    if q_pos is None:
        q_pos = np.array([max(0, int(n) - 1) for n in fills[:b]], np.int32)
        if b > 1:
            q_pos[1] = max(0, q_pos[1] - 5)  # the last 5 positions are in its future
        if b > 2:
            q_pos[-1] = -1
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, hk, c, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, hk, c, d), jnp.float32).astype(dtype)
    return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos, jnp.int32)


def quantized_cache(seed: int, b: int, hk: int, capacity: int, d: int, dtype, *, bits: int, group: int, ring: int,
                    ring_fill=None):
    """A KIVI layer cache filled from random normal keys / values quantized with the real
    quantizer (so scales are realistic), ragged positions in the quantized region, a partly filled
    ring, and per-head empty groups."""
    cache = init_quantized_layer(b, hk, capacity, d, dtype, bits=bits, group_size=group, residual_length=ring,
                                 scale_dtype=jnp.float16)
    cq = cache.quantized_slots
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 4)
    k = jax.random.normal(keys[0], (b, hk, cq, d), jnp.float32) * 1.5
    v = jax.random.normal(keys[1], (b, hk, cq, d), jnp.float32)
    kq, ks, km, vq, vs, vm = jax.jit(lambda k, v: (*quant.quantize_keys(k, bits, group, jnp.float16),
                                                 *quant.quantize_values(v, bits, group, jnp.float16)))(k, v)
    fills = [cq, cq // 2] + [int(x) for x in rng.integers(0, cq + 1, max(0, b - 2))]
    qpos = ragged_positions(rng, b, hk, cq, fills[:b])
    ring_fill = ring_fill if ring_fill is not None else [ring, ring // 2] + [ring // 3] * max(0, b - 2)
    rpos = np.full((b, hk, ring), -1, np.int32)
    for bi in range(b):
        n = ring_fill[bi]
        start = rng.integers(0, ring)
        for t in range(n):  # ring order: start, start + 1, ... (wrapping)
            rpos[bi, :, (start + t) % ring] = cq + 10 + t
    pos = np.concatenate([qpos, rpos], axis=-1)
    return cache.replace(kq=kq, k_scale=ks, k_min=km, vq=vq, v_scale=vs, v_min=vm,
                         k_res=jax.random.normal(keys[2], cache.k_res.shape, jnp.float32).astype(dtype),
                         v_res=jax.random.normal(keys[3], cache.v_res.shape, jnp.float32).astype(dtype),
                         pos=jnp.asarray(pos))


def quantized_arrays(cache):
    """(arrays, layout): a KIVI cache as the kernels take it, (kq, k_scale, k_min, vq, v_scale, v_min,
    k_res, v_res, pos) and dict(bits=..., group_size=...)."""
    arrays = (cache.kq, cache.k_scale, cache.k_min, cache.vq, cache.v_scale, cache.v_min, cache.k_res, cache.v_res,
              cache.pos)
    return arrays, dict(bits=cache.bits, group_size=cache.group_size)


def jitted(fn, **static):
    """fn with keyword arguments bound, under jit (eager calls compile every small op separately)."""
    return jax.jit(functools.partial(fn, **static))


def assert_close(got, want, atol, what):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: {np.sum(~np.isfinite(got))} non-finite elements (unwritten?)"
    err = np.max(np.abs(got - want)) if got.size else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"
