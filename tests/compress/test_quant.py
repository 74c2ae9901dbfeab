"""KIVI quantization primitives and QuantizedCompressor round trips: dequantization error within half
of the stored step of each group (every bits value and scale dtype), exact packing, an exact
full-precision residual window, measured bytes, and the errors for bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.compress.quantized import QuantizedCompressor
from pikv_jax.kernels import quant


def _data(seed, shape=(2, 3, 64, 32)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., 3] *= 40.0  # an outlier channel, as keys have
    x[..., 5, :] += 7.0  # an outlier token
    return jnp.asarray(x)


def _tol(x):
    return 1e-6 * float(jnp.max(jnp.abs(x)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_key_and_value_round_trip_within_half_step(bits, scale_dtype):
    g = 16
    x = _data(bits)
    kq, ks, km = quant.quantize_keys(x, bits, g, scale_dtype)
    assert kq.dtype == jnp.uint8 and kq.shape == x.shape[:-1] + (x.shape[-1] * bits // 8,)
    assert ks.dtype == scale_dtype and ks.shape == (2, 3, 64 // g, 32)
    err = jnp.abs(quant.dequantize_keys(kq, ks, km, bits, g) - x)
    step = jnp.repeat(ks.astype(jnp.float32), g, axis=2)  # the step of each element's (token group, channel)
    assert bool(jnp.all(err <= 0.5 * step + _tol(x)))

    vq, vs, vm = quant.quantize_values(x, bits, g, scale_dtype)
    assert vs.shape == (2, 3, 64, 32 // g)
    err = jnp.abs(quant.dequantize_values(vq, vs, vm, bits, g) - x)
    step = jnp.repeat(vs.astype(jnp.float32), g, axis=3)  # (token, channel group)
    assert bool(jnp.all(err <= 0.5 * step + _tol(x)))


def test_constant_group_is_exact():
    x = jnp.full((1, 1, 16, 16), 3.25, jnp.float32)
    for bits in (2, 4, 8):
        kq, ks, km = quant.quantize_keys(x, bits, 16)
        np.testing.assert_array_equal(quant.dequantize_keys(kq, ks, km, bits, 16), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_exact(bits):
    codes = jax.random.randint(jax.random.key(bits), (3, 5, 64), 0, 2**bits).astype(jnp.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(quant.unpack(packed, bits), codes)


def test_packing_bit_layout():
    # first code in the lowest bits
    assert int(quant.pack(jnp.array([1, 2], jnp.uint8), 4)[0]) == 1 | (2 << 4)
    assert int(quant.pack(jnp.array([1, 2, 3, 0], jnp.uint8), 2)[0]) == 1 | (2 << 2) | (3 << 4)


def test_residual_window_is_exact_and_bytes_are_measured():
    x, y = _data(0, (2, 3, 45, 32)), _data(1, (2, 3, 45, 32))
    c = QuantizedCompressor(bits=4, group_size=8, residual_length=16)
    out = c(x, y)
    sq = 32  # ceil((45 - 16) / 8) * 8 tokens quantized, the newest 13 (>= R - G + 1) in full precision
    assert out.kq.shape[2] == sq and out.k_res.shape[2] == 45 - sq
    rk, rv = out.decompress()
    np.testing.assert_array_equal(rk[:, :, sq:], x[:, :, sq:])
    np.testing.assert_array_equal(rv[:, :, sq:], y[:, :, sq:])
    leaves = jax.tree_util.tree_leaves(out)
    assert out.nbytes() == sum(np.asarray(a).nbytes for a in leaves)
    stats = c.get_compression_stats()
    assert stats["stored_bytes"] == out.nbytes()
    assert stats["full_bf16_bytes"] == 2 * 2 * x.size
    assert stats["compression_ratio_vs_bf16"] == pytest.approx(2 * 2 * x.size / out.nbytes())
    assert stats["compression_ratio"] == pytest.approx(2 * 4 * x.size / out.nbytes())  # float32 input
    assert stats["method_usage"] == {"int4": 1} and 0 < stats["relative_error"] < 0.2


def test_attend_matches_dequantized_attention():
    x, y = _data(2, (1, 2, 40, 32)), _data(3, (1, 2, 40, 32))
    out = QuantizedCompressor(bits=8, group_size=8, residual_length=8)(x, y)
    q = jax.random.normal(jax.random.key(0), (1, 4, 32))
    k, v = out.decompress()
    logits = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(1, 2, 2, 32), k) / np.sqrt(32)
    ref = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(logits, -1), v).reshape(1, 4, 32)
    np.testing.assert_allclose(out.attend(q), ref, rtol=1e-5, atol=1e-5)


def test_errors():
    x = _data(0, (1, 1, 64, 32))
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedCompressor(bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        quant.pack(jnp.zeros((4,), jnp.uint8), 1)
    with pytest.raises(ValueError, match="must divide the head dimension 32"):
        QuantizedCompressor(bits=4, group_size=24, residual_length=48)(x, x)
    with pytest.raises(ValueError, match="residual_length=48 must be a positive multiple of group_size=32"):
        QuantizedCompressor(bits=4, group_size=32, residual_length=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantizedCompressor(bits=4, group_size=32, residual_length=16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quant.quantize_keys(x[:, :, :30], 4, 16)
    with pytest.raises(ValueError, match="multiple of 2"):
        quant.pack(jnp.zeros((3,), jnp.uint8), 4)
    with pytest.raises(ValueError, match="NaN"):
        QuantizedCompressor(bits=8)(x.at[0, 0, 0, 0].set(jnp.nan), x)
