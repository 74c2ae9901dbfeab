"""Quest kernels against the policy's own math: top-k page selection (max / mean / sum over the
group, forced newest page, fewer non-empty pages than k, ties) and attention over the selected
pages (page-table gather on Triton, scalar-prefetch page walk on Mosaic TPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import assert_close, jitted

from pikv_jax.cache.policies.quest import page_bounds
from pikv_jax.kernels import decode_attention as da
from pikv_jax.kernels import quest as kq


def _quest_case(seed, b, h, hk, c, d, ps, fills):
    keys = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(keys[0], (b, hk, c, d), jnp.float32)
    v = jax.random.normal(keys[1], (b, hk, c, d), jnp.float32)
    q = jax.random.normal(keys[2], (b, h, d), jnp.float32)
    fills = jnp.asarray(fills)
    pos = jnp.where(jnp.arange(c)[None, None] < fills[:, None, None], jnp.arange(c)[None, None], -1)
    pos = jnp.broadcast_to(pos, (b, hk, c)).astype(jnp.int32)
    pmin, pmax = page_bounds(k, pos, ps)
    n = c // ps
    nonempty = jnp.any(pos.reshape(b, hk, n, ps) >= 0, axis=-1)
    newest = jnp.broadcast_to(jnp.where(fills > 0, (fills - 1) // ps, -1)[:, None], (b, hk)).astype(jnp.int32)
    return q, k, v, pos, pmin, pmax, nonempty, newest, (fills - 1).astype(jnp.int32)


@pytest.mark.parametrize("backend, reduce, k_sel, fills", [
    ("triton", "max", 4, [157, 50]),
    ("triton", "mean", 6, [40, 157]),  # row 0: 3 non-empty pages < 6 selected
    ("mosaic_tpu", "sum", 5, [157, 17]),
])
def test_select_matches_top_k(backend, reduce, k_sel, fills):
    q, k, v, pos, pmin, pmax, nonempty, newest, _ = _quest_case(len(fills) + k_sel, 2, 8, 2, 160, 32, 16, fills)
    pages, ok = jitted(kq.select_pages, k=k_sel, page_reduce=reduce, backend=backend)(q, pmin, pmax, nonempty, newest)
    want_pages, want_ok = jitted(kq.select_reference, k=k_sel, page_reduce=reduce)(q, pmin, pmax, nonempty, newest)
    assert np.array_equal(np.asarray(ok), np.asarray(want_ok))
    assert np.array_equal(np.where(want_ok, pages, -1), np.where(want_ok, want_pages, -1))
    assert np.all(np.asarray(pages)[..., 0] == np.asarray(newest))  # the newest token's page comes first


def test_select_ties_resolve_to_lowest_page():
    q = jnp.ones((1, 2, 16), jnp.float32)
    pmin = jnp.zeros((1, 1, 8, 16))
    pmax = jnp.ones((1, 1, 8, 16)).at[0, 0, 5].set(2.0)  # page 5 best, the other seven tie
    ne = jnp.ones((1, 1, 8), bool)
    pages, ok = kq.select_pages(q, pmin, pmax, ne, jnp.array([[-1]]), 4, backend="triton")
    assert pages.tolist() == [[[5, 0, 1, 2]]] and bool(jnp.all(ok))


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_paged_attention_matches_gathered_reference(backend):
    d = 32 if backend == "triton" else 128
    q, k, v, pos, pmin, pmax, nonempty, newest, q_pos = _quest_case(7, 2, 8, 2, 160, d, 16, [157, 40])
    pages, ok = kq.select_reference(q, pmin, pmax, nonempty, newest, 5)
    table = jnp.where(ok, pages, -1)
    out, mass = jitted(da.paged_decode_attention, page_size=16, backend=backend, block_k=32)(q, k, v, pos, q_pos, table)
    slots = (jnp.maximum(table, 0)[..., None] * 16 + jnp.arange(16)).reshape(2, 2, -1)
    take = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)
    sel_pos = jnp.where(jnp.repeat(table >= 0, 16, axis=-1), jnp.take_along_axis(pos, slots, axis=-1), -1)
    ref_out, ref_mass = jitted(da.reference)(q, take(k), take(v), sel_pos, q_pos)
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(mass, ref_mass, 2e-6, "mass")
