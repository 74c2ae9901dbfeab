"""Expert-sharded KV cache: placement by the router's top-1 expert, and attention that is exact
against the unsharded reference attention over the same tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.attention.reference import decode_attention as reference_decode_attention
from pikv_jax.moe import create_moe_router
from pikv_jax.moe import expert_cache as xc

E, B, HKV, G, D = 4, 2, 2, 2, 8


def random_tokens(seed, s):
    ks = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(ks[0], (B, s, HKV, D))
    v = jax.random.normal(ks[1], (B, s, HKV, D))
    expert = jax.random.randint(ks[2], (B, s), 0, E)
    return k, v, expert


def dense_attention(q, k, v, n_valid, q_pos, window=None):
    """Plain softmax attention over the first n_valid[b] tokens of contiguous k, v [B, S, Hkv, D]."""
    q = np.asarray(q, np.float64).reshape(B, HKV, G, D)
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    out = np.zeros((B, HKV, G, D))
    for b in range(B):
        lo = 0 if window is None else max(0, int(q_pos[b]) - window + 1)
        idx = np.arange(lo, int(n_valid[b]))
        logits = np.einsum("hgd,shd->hgs", q[b], k[b, idx]) / np.sqrt(D)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("hgs,shd->hgd", p, v[b, idx])
    return out.reshape(B, HKV * G, D)


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_plus_decode_attention_is_exact(window):
    s = 12
    lengths = jnp.array([12, 7])
    k, v, expert = random_tokens(0, s + 3)
    pos = jnp.where(jnp.arange(s)[None] < lengths[:, None], jnp.arange(s)[None], -1)
    cache = xc.init_expert_sharded_cache(E, B, HKV, 6, D)
    cache = xc.write_tokens(cache, k[:, :s], v[:, :s], pos, expert[:, :s])
    assert int(cache.spilled.sum()) + int(cache.dropped.sum()) >= 0
    # three decode steps, one token per row at each row's own position
    for step in range(3):
        cache = xc.write_token(cache, k[:, s + step], v[:, s + step], lengths + step, expert[:, s + step])
    np.testing.assert_array_equal(np.asarray(cache.length), np.asarray(lengths) + 3)
    q = jax.random.normal(jax.random.key(9), (B, HKV * G, D))
    q_pos = lengths + 2
    out, mass = xc.decode_attention(q, cache, q_pos, sliding_window=window)
    # 1) the same slots laid out as one unsharded cache, through the project's reference attention
    k_flat, v_flat, pos_flat = xc.as_unsharded(cache)
    ref_out, ref_mass = reference_decode_attention(q, k_flat, v_flat, pos_flat, q_pos, sliding_window=window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)
    mass_flat = xc.as_unsharded(cache.replace(k=mass[..., None], v=mass[..., None]))[0][..., 0]  # slot order
    np.testing.assert_allclose(np.asarray(mass_flat), np.asarray(ref_mass), atol=1e-6)
    # 2) an independent plain attention over the tokens in order (row 1: prompt 7 + 3 decoded, stored
    #    contiguously here by construction)
    k_seq = jnp.concatenate([k[:1, :s + 3], jnp.concatenate([k[1:, :7], k[1:, s:s + 3], k[1:, 7:s]], 1)], 0)
    v_seq = jnp.concatenate([v[:1, :s + 3], jnp.concatenate([v[1:, :7], v[1:, s:s + 3], v[1:, 7:s]], 1)], 0)
    np.testing.assert_allclose(np.asarray(out), dense_attention(q, k_seq, v_seq, lengths + 3, q_pos, window),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(mass).sum(axis=(0, 3)), 1.0, atol=1e-5)


def test_tokens_live_in_their_experts_shard_until_it_is_full():
    s = 10
    k, v, _ = random_tokens(1, s)
    expert = jnp.array([[0] * 7 + [1, 2, 3], [3] * 10])
    pos = jnp.broadcast_to(jnp.arange(s), (B, s))
    cache = xc.write_tokens(xc.init_expert_sharded_cache(E, B, HKV, 4, D), k, v, pos, expert)
    p = np.asarray(cache.pos[:, :, 0])  # [E, B, C]
    # row 0: expert 0 holds positions 0..3, positions 4..6 spill to the first free slots (shard order)
    np.testing.assert_array_equal(p[0, 0], [0, 1, 2, 3])
    assert set(p[1, 0]) == {4, 5, 6, 7}  # spilled 4, 5, 6 fill expert 1's shard after its own token 7
    assert int(cache.spilled[0]) == 3 and int(cache.dropped[0]) == 0
    # row 1: 10 tokens for expert 3; 4 stay, 6 spill into shards 0, 1 (shard order), nothing dropped
    np.testing.assert_array_equal(p[3, 1], [0, 1, 2, 3])
    assert int(cache.spilled[1]) == 6 and int(cache.dropped[1]) == 0
    np.testing.assert_array_equal(np.asarray(cache.tokens_per_shard()), [[4, 4, 1, 1], [4, 2, 0, 4]])
    # keys really are stored where pos says
    e, c = np.argwhere(p[:, 0] == 8)[0]
    np.testing.assert_array_equal(np.asarray(cache.k[e, 0, :, c]), np.asarray(k[0, 8]))
    # a full cache drops and counts
    full = xc.write_tokens(cache, k, v, pos + s, expert)
    assert int(full.dropped[0]) == 4 and int(full.dropped[1]) == 4


def test_merge_of_arbitrary_partials_is_softmax():
    logits = jax.random.normal(jax.random.key(2), (1, 1, 12)) * 3
    vals = jax.random.normal(jax.random.key(3), (12, 5))
    parts = [(0, 3), (3, 4), (4, 12)]
    o, m, l = [], [], []
    for a, b in parts:
        lg = logits[..., a:b]
        mm = lg.max(-1)
        p = jnp.exp(lg - mm[..., None])
        o.append(jnp.einsum("bhs,sd->bhd", p, vals[a:b]) / p.sum(-1)[..., None])
        m.append(mm)
        l.append(p.sum(-1))
    out, big_m, den = xc.merge_partials(jnp.stack(o), jnp.stack(m), jnp.stack(l))
    ref = jnp.einsum("bhs,sd->bhd", jax.nn.softmax(logits, -1), vals)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    np.testing.assert_allclose(float(big_m[0, 0] + jnp.log(den[0, 0])), float(jax.nn.logsumexp(logits)), atol=1e-5)


def test_router_top1_placement_and_cache_aware_routing():
    h = 16
    router = create_moe_router("pikv", h, E, 2, affinity_weight=10.0)
    hidden = jax.random.normal(jax.random.key(4), (B, 9, h))
    expert = xc.route_top1(router, hidden)
    np.testing.assert_array_equal(np.asarray(expert), np.asarray(router.route(hidden).expert_idx[:, 0]).reshape(B, 9))
    k, v, _ = random_tokens(5, 9)
    cache = xc.write_tokens(xc.init_expert_sharded_cache(E, B, HKV, 9, D), k, v,
                            jnp.broadcast_to(jnp.arange(9), (B, 9)), expert)
    counts = np.asarray(cache.tokens_per_shard())
    np.testing.assert_array_equal(counts, np.stack([np.bincount(np.asarray(expert[b]), minlength=E) for b in range(B)]))
    nxt = router.route(jax.random.normal(jax.random.key(6), (B, 1, h)), cache_affinity=cache.tokens_per_shard())
    busiest = counts.argmax(-1)
    np.testing.assert_array_equal(np.asarray(nxt.expert_idx[:, 0]), busiest)


def test_empty_cache_gives_zero_output_not_nan():
    cache = xc.init_expert_sharded_cache(E, B, HKV, 3, D)
    out, mass = xc.decode_attention(jnp.ones((B, HKV * G, D)), cache, jnp.array([0, 0]))
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) == 0.0
    assert float(mass.sum()) == 0.0
    with pytest.raises(ValueError, match="shard_capacity"):
        xc.init_expert_sharded_cache(E, B, HKV, 0, D)
    k, v, _ = random_tokens(0, 2)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        xc.write_tokens(cache, k, v, jnp.zeros((B, 2), jnp.int32), jnp.full((B, 2), 4))
