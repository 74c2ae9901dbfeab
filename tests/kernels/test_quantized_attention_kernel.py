"""KIVI decode attention with fused dequantization (Triton and Mosaic TPU, interpreted) against
the dequantize-then-attend reference: int8 / int4 / int2, float32 and bfloat16 queries, ragged
quantized regions, partly filled rings, GQA, windows, a cache whose capacity fits in the ring, a
bfloat16 ring under float32 queries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import QUANT_TOL, assert_close, jitted, quantized_arrays, quantized_cache

from pikv_jax.kernels import quantized_attention as qa
from pikv_jax.kernels.common import KernelUnsupported

CASES = [
    # backend, B, H, Hkv, capacity, D, bits, group, ring, dtype, window, reduce
    pytest.param("triton", 3, 8, 2, 200, 32, 4, 16, 32, "float32", None, "mean", marks=pytest.mark.slow),
    ("triton", 2, 4, 2, 130, 32, 2, 16, 32, "float32", 60, "max"),
    pytest.param("triton", 2, 8, 4, 100, 64, 8, 32, 32, "bfloat16", None, "sum", marks=pytest.mark.slow),
    ("mosaic_tpu", 2, 8, 2, 300, 128, 4, 32, 128, "float32", None, "mean"),
    pytest.param("mosaic_tpu", 2, 4, 2, 200, 64, 8, 32, 64, "bfloat16", 150, "max", marks=pytest.mark.slow),
]


def _q(seed, b, h, d, dtype):
    return jax.random.normal(jax.random.key(seed), (b, h, d), jnp.float32).astype(dtype)


@pytest.mark.parametrize("backend, b, h, hk, cap, d, bits, group, ring, dtype, window, reduce", CASES)
def test_matches_reference(backend, b, h, hk, cap, d, bits, group, ring, dtype, window, reduce):
    dt = jnp.dtype(dtype)
    cache = quantized_cache(cap + bits, b, hk, cap, d, dt, bits=bits, group=group, ring=ring)
    q = _q(cap, b, h, d, dt)
    q_pos = jnp.asarray(np.r_[[cache.quantized_slots + 10 + ring], np.full(b - 1, cache.quantized_slots // 2)],
                        jnp.int32)  # row 0 sees everything; others only part of the quantized region
    arrays, layout = quantized_arrays(cache)
    out, mass = jitted(qa.quantized_decode_attention, sliding_window=window, group_reduce=reduce,
                       backend=backend, **layout)(q, *arrays, q_pos)
    ref_out, ref_mass = jitted(qa.reference, sliding_window=window, group_reduce=reduce, **layout)(q, *arrays, q_pos)
    out_tol, mass_tol = QUANT_TOL[dtype]
    assert out.dtype == q.dtype and mass.shape == cache.pos.shape
    assert_close(out, ref_out, out_tol, "out")
    assert_close(mass, ref_mass, mass_tol, "mass")
    assert np.all(np.asarray(mass)[np.asarray(cache.pos) < 0] == 0)


def test_ring_only_cache():
    """Capacity within the ring: no quantized slots, the ring kernel alone."""
    cache = quantized_cache(3, 2, 2, 32, 32, jnp.float32, bits=4, group=16, ring=32, ring_fill=[20, 32])
    assert cache.quantized_slots == 0
    q = _q(4, 2, 4, 32, jnp.float32)
    q_pos = jnp.array([100, 100], jnp.int32)
    arrays, layout = quantized_arrays(cache)
    out, mass = jitted(qa.quantized_decode_attention, backend="triton", **layout)(q, *arrays, q_pos)
    ref_out, ref_mass = jitted(qa.reference, **layout)(q, *arrays, q_pos)
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(mass, ref_mass, 2e-6, "mass")


def test_unsupported_raise():
    cache = quantized_cache(5, 1, 2, 80, 48, jnp.float32, bits=4, group=16, ring=32)
    arrays, layout = quantized_arrays(cache)
    with pytest.raises(KernelUnsupported, match="powers of two"):
        qa.quantized_decode_attention(_q(1, 1, 4, 48, jnp.float32), *arrays, jnp.array([5]), backend="triton",
                                      **layout)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_bfloat16_ring_under_float32_queries(backend):
    """The policy's default ring dtype (bfloat16) under a float32 model: the kernel casts the ring
    to the query's dtype, the reference computes in float32; they agree like an all-f32 cache."""
    cache = quantized_cache(11, 2, 2, 200, 64, jnp.float32, bits=4, group=32, ring=64)
    cache = cache.replace(k_res=cache.k_res.astype(jnp.bfloat16), v_res=cache.v_res.astype(jnp.bfloat16))
    q = _q(12, 2, 4, 64, jnp.float32)
    q_pos = jnp.asarray([cache.quantized_slots + 100, cache.quantized_slots // 2], jnp.int32)
    arrays, layout = quantized_arrays(cache)
    out, mass = jitted(qa.quantized_decode_attention, backend=backend, **layout)(q, *arrays, q_pos)
    ref_out, ref_mass = jitted(qa.reference, **layout)(q, *arrays, q_pos)
    out_tol, mass_tol = QUANT_TOL["float32"]
    assert out.dtype == jnp.float32
    assert_close(out, ref_out, out_tol, "out")
    assert_close(mass, ref_mass, mass_tol, "mass")
