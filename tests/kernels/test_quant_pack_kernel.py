"""Quantize-and-pack kernel: bit-identical to kernels/quant.py for 2 / 4 / 8 bits, float16 /
bfloat16 / float32 scales, constant groups (zero range) and partial blocks of groups; the bit-level
nextafter it uses matches jnp.nextafter on every special value."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.kernels import quant_pack as qp
from pikv_jax.kernels.common import KernelUnsupported


@pytest.mark.parametrize("backend, shape, bits, group, scale_dtype, dtype", [
    ("triton", (2, 3, 96, 32), 4, 16, "float16", "float32"),
    pytest.param("triton", (2, 64, 64), 2, 16, "bfloat16", "float32", marks=pytest.mark.slow),
    pytest.param("triton", (1, 320, 64), 8, 32, "float32", "bfloat16", marks=pytest.mark.slow),
    pytest.param("mosaic_tpu", (2, 32, 128), 4, 32, "bfloat16", "float32", marks=pytest.mark.slow),
    ("mosaic_tpu", (1, 320, 128), 2, 32, "float32", "bfloat16"),
])
def test_bit_identical_to_reference(backend, shape, bits, group, scale_dtype, dtype):
    k = jax.random.normal(jax.random.key(bits), shape, jnp.float32) * 3
    v = jax.random.normal(jax.random.key(group), shape, jnp.float32) * 0.01 + 5
    k = k.at[..., :group, 0].set(1.5)  # a constant key group: zero range
    v = v.at[..., 0, :].set(-2.0)  # a constant value token
    k, v = k.astype(dtype), v.astype(dtype)
    static = dict(bits=bits, group_size=group, scale_dtype=jnp.dtype(scale_dtype))
    got = jax.jit(functools.partial(qp.quantize_kv, backend=backend, **static))(k, v)
    want = jax.jit(functools.partial(qp.reference, **static))(k, v)
    names = ("kq", "k_scale", "k_min", "vq", "v_scale", "v_min")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bit_level_nextafter(dtype):
    dt = jnp.dtype(dtype)
    fi = jnp.finfo(dt)
    y = jnp.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, float(fi.max), -float(fi.max), float(fi.tiny), -float(fi.tiny),
                   float(fi.smallest_subnormal), -float(fi.smallest_subnormal), 3.1416, -1e-3, jnp.inf, -jnp.inf], dt)
    for up in (True, False):
        want = jnp.nextafter(y, jnp.full_like(y, jnp.inf if up else -jnp.inf))
        assert np.array_equal(np.asarray(qp._step(y, up)).view(np.int16), np.asarray(want).view(np.int16))


def test_unsupported_raise():
    x = jnp.ones((1, 32, 48))
    with pytest.raises(KernelUnsupported, match="powers of two"):
        qp.quantize_kv(x, x, 4, 16, backend="triton")
    with pytest.raises(KernelUnsupported, match="multiples of group_size"):
        qp.quantize_kv(jnp.ones((1, 40, 32)), jnp.ones((1, 40, 32)), 4, 16, backend="mosaic_tpu")
