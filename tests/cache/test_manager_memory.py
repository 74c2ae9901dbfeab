"""The scheduling manager's bounded memory, its input layouts, and attention policies fed no queries."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pikv_jax.scheduling import CacheSchedulingManager, SchedulingPolicy


def _held_bytes(m) -> int:
    """Bytes of every array the manager holds, read from its state tree."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(m._state))


@pytest.mark.parametrize("policy", [SchedulingPolicy.H2O, SchedulingPolicy.QUEST, SchedulingPolicy.ADAKV,
                                    SchedulingPolicy.SNAPKV], ids=lambda p: p.name)
def test_bytes_stay_flat_when_fed_8x_the_cache(policy):
    cache, hidden, chunk = 16, 32, 16
    rng = np.random.default_rng(0)
    m = CacheSchedulingManager(cache, hidden, policy, num_kv_heads=2, num_heads=4, page_size=4) \
        if policy is SchedulingPolicy.QUEST else CacheSchedulingManager(cache, hidden, policy, num_kv_heads=2,
                                                                         num_heads=4)
    held, reported = [], []
    for _ in range(8):  # 8 x cache_size tokens in 8 calls
        k, v = rng.normal(size=(2, 2, chunk, hidden)).astype(np.float32)
        q = rng.normal(size=(2, chunk, 2 * hidden)).astype(np.float32)
        m.update_cache(k, v, {"queries": q})
        held.append(_held_bytes(m))
        reported.append(m.get_cache_stats()["manager_bytes"])
    st_ = m.get_cache_stats()
    assert st_["tokens_seen"] == 2 * 8 * cache and st_["total_evictions"] == 2 * 7 * cache
    assert reported == held  # manager_bytes counts every array held
    assert len(set(held)) == 1  # flat: nothing grows with the tokens seen
    assert st_["cache_bytes"] < held[0] <= 2.5 * st_["cache_bytes"]  # the cache plus a ring of evicted keys
    assert held[0] < st_["full_cache_bytes"]


def test_no_hit_tracking_holds_only_the_cache():
    m = CacheSchedulingManager(8, 16, SchedulingPolicy.H2O, num_kv_heads=2, track_hit_rate=False)
    k = np.random.default_rng(1).normal(size=(1, 20, 16)).astype(np.float32)
    m.update_cache(k[:, :4], k[:, :4])
    m.update_cache(k[:, 4:], k[:, 4:], {"queries": k[:, 4:]})
    st_ = m.get_cache_stats()
    assert st_["manager_bytes"] == st_["cache_bytes"] + 4  # the cache and the row's token count
    assert st_["hit_rate_kind"] == "residency" and st_["hit_rate"] == pytest.approx(8 / 20)


@pytest.mark.parametrize("policy", [SchedulingPolicy.H2O, SchedulingPolicy.TOVA, SchedulingPolicy.LRU],
                         ids=lambda p: p.name)
def test_attention_policies_without_queries_rank_by_the_keys_attention(policy):
    """Token 4 (the first non-sink) draws most of every key's attention: slot order would evict it
    first; ranking by the keys' own attention keeps it."""
    rng = np.random.default_rng(2)
    u = np.eye(8, dtype=np.float32)[0]
    k = (2.0 * u + 0.3 * rng.normal(size=(1, 24, 8))).astype(np.float32)
    k[0, 4] = 6.0 * u
    v = rng.normal(size=(1, 24, 8)).astype(np.float32)
    m = CacheSchedulingManager(8, 8, policy)
    m.update_cache(k[:, :8], v[:, :8])
    m.update_cache(k[:, 8:], v[:, 8:])
    pos = m.get_cached_positions()[0, 0]
    assert 4 in pos and 23 in pos
    assert not {5, 6}.issubset(set(pos.tolist()))
    assert m.get_cache_stats()["hit_rate_kind"] == "residency"


def test_model_layout_keys_are_accepted():
    """[B, heads, S, head_dim] (a model's per-layer keys, as in the guide) and [B, 1, S, hidden]
    give the same cache as [B, S, hidden]; queries may use the same layout."""
    rng = np.random.default_rng(3)
    b, s, heads, d = 2, 14, 4, 4
    k, v = rng.normal(size=(2, b, heads, s, d)).astype(np.float32)
    q = rng.normal(size=(b, heads, s, 2 * d)).astype(np.float32)  # 4 query heads of the 2 KV heads' width 8
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b, s, -1)
    runs = []
    for keys, values, queries in ((k, v, q), (flat(k), flat(v), flat(q)), (flat(k)[:, None], flat(v)[:, None], q)):
        m = CacheSchedulingManager(8, heads * d, SchedulingPolicy.H2O, num_kv_heads=2, num_heads=4)
        m.update_cache(keys[..., :4, :], values[..., :4, :], {"queries": queries[..., :4, :]})
        m.update_cache(keys[..., 4:, :], values[..., 4:, :], {"queries": queries[..., 4:, :]})
        runs.append((m.get_cached_positions(), m.get_cached_data(), m.get_cache_stats()["hit_rate"]))
    for pos, data, hit in runs[1:]:
        np.testing.assert_array_equal(pos, runs[0][0])
        for (ka, va), (kb, vb) in zip(data, runs[0][1]):
            np.testing.assert_allclose(ka, kb)
            np.testing.assert_allclose(va, vb)
        assert hit == pytest.approx(runs[0][2])
    m = CacheSchedulingManager(8, 16)
    with pytest.raises(ValueError, match=r"^keys must be .*heads \* head_dim = 16; got shape \(1, 3, 5, 5\)$"):
        m.update_cache(np.zeros((1, 3, 5, 5)), np.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"^values must be"):
        m.update_cache(np.zeros((1, 4, 5, 4)), np.zeros((1, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"^metadata\['queries'\] must be"):
        m.update_cache(np.zeros((1, 4, 5, 4)), np.zeros((1, 4, 5, 4)), {"queries": np.zeros((1, 5, 4, 3))})


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(list(SchedulingPolicy)), chunks=st.integers(2, 6), with_queries=st.booleans(),
       prefill=st.booleans(), seed=st.integers(0, 2**16))
def test_stats_invariants(policy, chunks, with_queries, prefill, seed):
    """For every policy and feed: hit_rate a number in [0, 1]; residency_rate the resident share;
    capacity kept; the bytes held flat from the first update on and all reported."""
    rng = np.random.default_rng(seed)
    m = CacheSchedulingManager(8, 8, policy, num_kv_heads=2, num_heads=4, page_size=2, token_budget=4) \
        if policy is SchedulingPolicy.QUEST else CacheSchedulingManager(8, 8, policy, num_kv_heads=2, num_heads=4)
    sizes = ([12] if prefill else []) + [4] * chunks
    held, measured = set(), False
    for n in sizes:
        measured |= with_queries and n == 4  # a decode step with a real query
        k, v, q = rng.normal(size=(3, 1, n, 8)).astype(np.float32)
        m.update_cache(k, v, {"queries": np.concatenate([q, q], -1)} if with_queries else None)
        s = m.get_cache_stats()
        held.add(_held_bytes(m))
        assert s["manager_bytes"] == _held_bytes(m)
        assert isinstance(s["hit_rate"], float) and 0.0 <= s["hit_rate"] <= 1.0 + 1e-6
        resident = (m.get_cached_positions() >= 0).sum(-1)
        assert resident.sum() <= 2 * 8
        assert s["residency_rate"] == pytest.approx(float(np.mean(resident / s["tokens_seen"])))
        assert s["hit_rate_kind"] == ("attention_mass" if measured else "residency")
    assert len(held) == 1
