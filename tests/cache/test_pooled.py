"""PooledLayerCache: layout, free-slot finding, writes, and decode attention equal to the uniform
reference on an equivalent cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.attention import reference
from pikv_jax.cache import pooled
from pikv_jax.cache.pooled import PooledLayerCache

# jitted entry points: one compilation each instead of op-by-op dispatch
attend = jax.jit(pooled.pooled_decode_attention, static_argnames=("sliding_window", "group_reduce"))
ref_attend = jax.jit(reference.decode_attention, static_argnames=("sliding_window", "group_reduce"))
gather = jax.jit(pooled.gather_prompt_pooled)
write = jax.jit(pooled.write_token_pooled)
free_slots = jax.jit(pooled.free_slots)


def _random_uniform(rng, b=2, hk=2, c=6, d=8, empty=0.3):
    """Uniform cache arrays with ragged, per-head distinct positions (some slots empty)."""
    k = rng.normal(size=(b, hk, c, d)).astype(np.float32)
    v = rng.normal(size=(b, hk, c, d)).astype(np.float32)
    pos = np.full((b, hk, c), -1, np.int32)
    for i in range(b):
        for h in range(hk):
            n = rng.integers(1, c + 1)
            chosen = np.sort(rng.choice(20, size=n, replace=False))
            slots = rng.choice(c, size=n, replace=False)
            pos[i, h, slots] = chosen
    return k, v, pos


def _to_pool(rng, k, v, pos, extra_slots=3, shuffle=True):
    """The same tokens in a pool: every uniform slot (empty ones too) becomes a pool slot owned by
    its head, in a random order per row, plus unassigned empty slots. Returns (cache, where) with
    where[b, h, c] = the pool slot of uniform slot (h, c)."""
    b, hk, c, d = k.shape
    p = hk * c + extra_slots
    kk = np.zeros((b, p, d), np.float32)
    vv = np.zeros((b, p, d), np.float32)
    pp = np.full((b, p), -1, np.int32)
    head = np.full((b, p), -1, np.int32)
    where = np.zeros((b, hk, c), np.int64)
    for i in range(b):
        perm = rng.permutation(p) if shuffle else np.arange(p)
        for h in range(hk):
            for j in range(c):
                s = perm[h * c + j]
                where[i, h, j] = s
                kk[i, s], vv[i, s], pp[i, s], head[i, s] = k[i, h, j], v[i, h, j], pos[i, h, j], h
    cache = PooledLayerCache(k=jnp.asarray(kk), v=jnp.asarray(vv), pos=jnp.asarray(pp), head=jnp.asarray(head),
                             score=jnp.zeros((b, p), jnp.float32), num_kv_heads=hk)
    return cache, where


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_pooled_attention_equals_uniform_reference(group_reduce, sliding_window):
    rng = np.random.default_rng(0)
    k, v, pos = _random_uniform(rng)
    b, hk, c, d = k.shape
    q = jnp.asarray(rng.normal(size=(b, 2 * hk, d)).astype(np.float32))
    q_pos = jnp.asarray([19, 17], jnp.int32)
    ref_out, ref_mass = ref_attend(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), q_pos,
                                                   sliding_window=sliding_window, group_reduce=group_reduce)
    cache, where = _to_pool(rng, k, v, pos)
    out, mass = attend(q, cache, q_pos, sliding_window=sliding_window,
                                               group_reduce=group_reduce)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    mass = np.asarray(mass)
    got = np.take_along_axis(mass, where.reshape(b, -1), axis=1).reshape(b, hk, c)
    np.testing.assert_allclose(got, ref_mass, rtol=1e-5, atol=1e-7)
    assigned = np.zeros_like(mass, bool)
    np.put_along_axis(assigned, where.reshape(b, -1), True, axis=1)
    assert np.all(mass[~assigned] == 0.0)  # unassigned slots get no mass


def test_segmented_attention_equals_uniform_reference():
    rng = np.random.default_rng(1)
    k, v, pos = _random_uniform(rng)
    b, hk, c, d = k.shape
    q = jnp.asarray(rng.normal(size=(b, 2 * hk, d)).astype(np.float32))
    q_pos = jnp.asarray([19, 19], jnp.int32)
    ref_out, ref_mass = ref_attend(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), q_pos)
    cache = pooled.init_pooled_cache(b, hk, hk * c, d, jnp.float32, segments=pooled.segments_from_sizes([c] * hk))
    cache = cache.replace(k=jnp.asarray(k.reshape(b, hk * c, d)), v=jnp.asarray(v.reshape(b, hk * c, d)),
                          pos=jnp.asarray(pos.reshape(b, hk * c)))
    out, mass = attend(q, cache, q_pos)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mass).reshape(b, hk, c), ref_mass, rtol=1e-5, atol=1e-7)
    # the masked (dynamic ownership) path gives the same on the same pool
    out2, mass2 = attend(q, cache.replace(segments=None), q_pos)
    np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass2, mass, rtol=1e-5, atol=1e-7)


def test_head_without_tokens_gives_zero_not_nan():
    cache = pooled.init_pooled_cache(1, 2, 4, 4, jnp.float32)
    cache = write(cache, jnp.ones((1, 2, 4)), jnp.ones((1, 2, 4)), jnp.asarray([0]),
                                      jnp.asarray([[0, 1]]), jnp.asarray([True]))
    cache = cache.replace(pos=cache.pos.at[0, 1].set(-1))  # head 1 now holds nothing
    out, mass = attend(jnp.ones((1, 4, 4)), cache, jnp.asarray([0]))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(mass))
    np.testing.assert_allclose(out[0, :2], 1.0)  # head 0: its single token
    np.testing.assert_allclose(out[0, 2:], 0.0)  # head 1: nothing to attend
    np.testing.assert_allclose(mass[0], [1.0, 0.0, 0.0, 0.0])


def test_free_slots_owned_first_then_distinct_unassigned():
    pos = jnp.asarray([[0, -1, 1, -1, -1, 5],    # head 0 owns free slot 1; head 1 needs an unassigned one
                       [0, 1, 2, -1, -1, -1],   # both heads need one: the 1st and 2nd unassigned free slots
                       [0, 1, 2, 3, -1, 4]])   # one unassigned slot left for two heads
    head = jnp.asarray([[0, 0, 1, -1, -1, 1],
                        [0, 0, 1, -1, -1, -1],
                        [0, 0, 1, 1, -1, 1]])
    cache = pooled.init_pooled_cache(3, 2, 6, 2, jnp.float32).replace(pos=pos, head=head)
    slot, ok = free_slots(cache)
    np.testing.assert_array_equal(slot[:2], [[1, 3], [3, 4]])
    np.testing.assert_array_equal(ok, [[True, True], [True, True], [True, False]])
    assert int(slot[2, 0]) == 4


def test_write_gather_and_layout_views():
    b, s, hk, d = 2, 5, 2, 3
    rng = np.random.default_rng(2)
    k = jnp.asarray(rng.normal(size=(b, s, hk, d)).astype(np.float32))
    v = k + 1.0
    pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]], jnp.int32)
    keep = jnp.asarray([[[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]],
                        [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]]], bool)  # row 1's padding is never kept
    cache = gather(pooled.init_pooled_cache(b, hk, 8, d, jnp.float32), k, v, pos, keep)
    np.testing.assert_array_equal(cache.pos, [[0, 2, 3, 1, 4, -1, -1, -1], [0, 1, 2, 2, -1, -1, -1, -1]])
    np.testing.assert_array_equal(cache.head, [[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(cache.k[0, 3], k[0, 1, 1])
    np.testing.assert_array_equal(cache.resident_per_head(), [[3, 2], [3, 1]])
    hp = np.asarray(cache.head_positions())
    np.testing.assert_array_equal(hp[0, 1], [-1, -1, -1, 1, 4, -1, -1, -1])
    # decode: one token per head into free slots; the inactive row is untouched
    slot, ok = free_slots(cache)
    np.testing.assert_array_equal(slot, [[5, 6], [4, 5]])
    new = write(cache, jnp.full((b, hk, d), 7.0), jnp.full((b, hk, d), 8.0),
                                    jnp.asarray([5, 3]), slot, jnp.asarray([True, False]))
    np.testing.assert_array_equal(new.pos[0], [0, 2, 3, 1, 4, 5, 5, -1])
    np.testing.assert_array_equal(new.head[0], [0, 0, 0, 1, 1, 0, 1, -1])
    np.testing.assert_array_equal(new.pos[1], cache.pos[1])
    np.testing.assert_array_equal(new.k[0, 6], [7.0] * d)
    # static segments: head h's kept tokens go to its own range
    seg = pooled.init_pooled_cache(b, hk, 7, d, jnp.float32, segments=((0, 4), (4, 7)))
    seg = gather(seg, k, v, pos, keep)
    np.testing.assert_array_equal(seg.pos, [[0, 2, 3, -1, 1, 4, -1], [0, 1, 2, -1, 2, -1, -1]])
    np.testing.assert_array_equal(seg.head[0], [0, 0, 0, 0, 1, 1, 1])


def test_nbytes_counts_every_array_and_pytree_roundtrip():
    cache = pooled.init_pooled_cache(2, 3, 10, 8, jnp.bfloat16)
    assert cache.nbytes() == 2 * 10 * (2 * 8 * 2 + 4 + 4 + 4)
    assert cache.capacity == cache.slots_per_row == 10 and cache.num_kv_heads == 3 and cache.batch == 2
    leaves, tree = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 5  # k, v, pos, head, score; num_kv_heads / segments are static
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.num_kv_heads == 3 and back.segments is None


def test_invalid_segments_raise():
    with pytest.raises(ValueError, match="segments"):
        pooled.init_pooled_cache(1, 2, 5, 4, jnp.float32, segments=((0, 2), (2, 4)))
    with pytest.raises(ValueError, match="slots"):
        pooled.init_pooled_cache(1, 2, 0, 4, jnp.float32)
