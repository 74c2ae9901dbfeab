"""Decode attention kernels (Triton and Mosaic TPU, interpreted on CPU) against the reference:
ragged rows, arbitrary slot order, holes, GQA ratios 1 / 2 / 4, capacities that are not powers of
two, sliding windows, the three group reductions, float32 and bfloat16, splits and block sizes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import TOL, assert_close, decode_case, jitted

from pikv_jax.kernels import common
from pikv_jax.kernels import decode_attention as da
from pikv_jax.kernels.common import KernelUnsupported

CASES = [
    # backend, B, H, Hkv, C, D, dtype, window, reduce, tuning
    ("triton", 3, 8, 2, 100, 32, "float32", None, "mean", dict(block_k=32, num_splits=2)),
    pytest.param("triton", 2, 4, 4, 77, 16, "float32", 20, "max", {}, marks=pytest.mark.slow),
    ("triton", 3, 8, 2, 200, 16, "bfloat16", None, "sum", dict(block_k=64, num_splits=3)),
    pytest.param("triton", 2, 16, 4, 45, 64, "bfloat16", 12, "mean", dict(block_k=16), marks=pytest.mark.slow),
    ("mosaic_tpu", 3, 8, 2, 300, 128, "float32", None, "mean", dict(block_k=128)),
    pytest.param("mosaic_tpu", 2, 4, 2, 100, 64, "bfloat16", 40, "max", {}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend, b, h, hk, c, d, dtype, window, reduce, tuning", CASES)
def test_matches_reference(backend, b, h, hk, c, d, dtype, window, reduce, tuning):
    q, k, v, pos, q_pos = decode_case(c + d + b, b, h, hk, c, d, jnp.dtype(dtype))
    out, mass = jitted(da.decode_attention, sliding_window=window, group_reduce=reduce, backend=backend,
                       **tuning)(q, k, v, pos, q_pos)
    ref_out, ref_mass = jitted(da.reference, sliding_window=window, group_reduce=reduce)(q, k, v, pos, q_pos)
    out_tol, mass_tol = TOL[dtype]
    assert out.dtype == q.dtype and mass.dtype == jnp.float32
    assert_close(out, ref_out, out_tol, "out")
    assert_close(mass, ref_mass, mass_tol, "mass")
    assert np.all(np.asarray(mass)[np.asarray(pos) < 0] == 0)  # empty slots get exactly 0
    if b > 2:  # the inactive row (q_pos = -1) attends to nothing
        assert np.all(np.asarray(out[-1]) == 0) and np.all(np.asarray(mass[-1]) == 0)


def test_per_head_query_positions_and_jit():
    """q_pos given per (row, KV head), as caches that re-index positions do; under jit."""
    q, k, v, pos, _ = decode_case(5, 2, 4, 2, 50, 16, jnp.float32)
    q_pos = jnp.array([[49, 30], [10, 16]], jnp.int32)
    fn = jax.jit(lambda *a: da.decode_attention(*a, backend="triton"))
    out, mass = fn(q, k, v, pos, q_pos)
    ref_out, ref_mass = jitted(da.reference)(q, k, v, pos, q_pos)
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(mass, ref_mass, 2e-6, "mass")


def test_partials_written_where_used():
    """Raw kernel outputs (interpret mode fills unwritten floats with NaN): every split's (o, m, l)
    and every logit below the row's last used slot are written; nothing reads the rest."""
    q, k, v, pos, q_pos = decode_case(11, 3, 8, 2, 90, 16, jnp.float32, fills=[90, 20, 0])
    parts = jitted(da.decode_partials, backend="triton", block_k=16, num_splits=3)(q, k, v, pos, q_pos)
    assert not np.any(np.isnan(np.asarray(parts.o))) and not np.any(np.isnan(np.asarray(parts.l)))
    limit = np.asarray(parts.limit)
    assert limit.tolist() == np.asarray(common.slot_limit(pos)).tolist()
    lg = np.asarray(parts.logits)
    for bi in range(3):
        for hi in range(2):
            assert not np.any(np.isnan(lg[bi, hi, :, :limit[bi, hi]]))
    assert limit[2].tolist() == [0, 0]  # an empty row reads no block at all


def test_tpu_skips_unused_blocks():
    """Rows whose used slots end early: blocks past them are neither fetched nor computed (their
    logits are written as -inf), and the result still matches."""
    q, k, v, pos, q_pos = decode_case(12, 2, 4, 2, 400, 128, jnp.float32, fills=[60, 0], q_pos=[70, 3])
    out, mass = jitted(da.decode_attention, backend="mosaic_tpu", block_k=128)(q, k, v, pos, q_pos)
    ref_out, ref_mass = jitted(da.reference)(q, k, v, pos, q_pos)
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(mass, ref_mass, 2e-6, "mass")


def test_unsupported_inputs_raise_clearly():
    q, k, v, pos, q_pos = decode_case(1, 1, 4, 2, 20, 24, jnp.float32)
    with pytest.raises(KernelUnsupported, match="head_dim 24"):
        da.decode_attention(q, k, v, pos, q_pos, backend="triton")
    with pytest.raises(KernelUnsupported, match="int32"):
        da.decode_attention(q, k.astype(jnp.int32), v, pos, q_pos, backend="mosaic_tpu")
    with pytest.raises(ValueError, match="group_reduce"):
        da.decode_attention(q, k, v, pos, q_pos, group_reduce="median", backend="mosaic_tpu")


def test_gradients_through_the_kernel():
    """jax.grad through pallas_call is impossible; the custom_vjp gives the reference's gradients."""
    q, k, v, pos, q_pos = decode_case(21, 2, 4, 2, 40, 16, jnp.float32)
    w = jax.random.normal(jax.random.key(1), (2, 2, 40))

    def loss(fn, q, k, v):
        out, mass = fn(q, k, v, pos, q_pos)
        return jnp.sum(out ** 2) + jnp.sum(mass * w)

    kernel = functools.partial(da.decode_attention, backend="triton", group_reduce="max")
    ref = functools.partial(da.reference, group_reduce="max")
    got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    for a, b, name in zip(got, want, "qkv"):
        assert_close(a, b, 1e-5, f"d{name}")
