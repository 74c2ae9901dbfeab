"""The seed's scheduling facade: eviction when full, measured statistics, policy switches, errors."""

import jax
import numpy as np
import pytest

from pikv_jax.scheduling import (
    CacheSchedulingManager,
    DuoAttentionScheduler,
    H2OScheduler,
    LRUScheduler,
    SchedulingPolicy,
    StreamingLLMScheduler,
)

RNG = np.random.default_rng(0)


def _data(b, s, hidden=32, heads=4):
    k = RNG.normal(size=(b, s, hidden)).astype(np.float32)
    v = RNG.normal(size=(b, s, hidden)).astype(np.float32)
    q = RNG.normal(size=(b, s, hidden * heads // 2)).astype(np.float32)
    return k, v, q


@pytest.mark.parametrize("policy", [SchedulingPolicy.NONE, SchedulingPolicy.H2O, SchedulingPolicy.LRU,
                                    SchedulingPolicy.STREAMING_LLM, SchedulingPolicy.TOVA, SchedulingPolicy.KNORM,
                                    SchedulingPolicy.SNAPKV])
def test_full_manager_evicts_and_keeps_newest(policy):
    m = CacheSchedulingManager(12, 32, policy, num_kv_heads=2, num_heads=4)
    k, v, q = _data(2, 30)
    for lo, hi in ((0, 5), (5, 19), (19, 30)):
        m.update_cache(k[:, lo:hi], v[:, lo:hi], {"queries": q[:, lo:hi]})
        pos = m.get_cached_positions()
        assert (np.sum(pos >= 0, axis=-1) <= 12).all()  # capacity never exceeded
        assert ((pos == hi - 1).any(axis=-1)).all()  # the newest token is never dropped
        for b in range(2):
            for h in range(2):
                live = pos[b, h][pos[b, h] >= 0]
                assert len(set(live.tolist())) == len(live)
    st = m.get_cache_stats()
    assert st["total_updates"] == 60
    assert st["total_evictions"] == 2 * (30 - 12)
    assert st["cache_utilization"] == 1.0
    assert 0.0 < st["hit_rate"] < 1.0


def test_hit_rate_is_one_without_eviction_and_matches_numpy():
    m = StreamingLLMScheduler(40, 8, start_size=2, num_kv_heads=1, num_heads=1)
    k, v, _ = _data(1, 30, hidden=8, heads=2)
    q = RNG.normal(size=(1, 30, 8)).astype(np.float32)
    m.update_cache(k, v, {"queries": q})
    assert m.get_cache_stats()["hit_rate"] == pytest.approx(1.0, abs=1e-6)

    # cache of 6 (2 sinks + 4 recent): compute the attention share on resident tokens by hand
    m = StreamingLLMScheduler(6, 8, start_size=2, num_kv_heads=1, num_heads=1, hit_window=32)
    m.update_cache(k[:, :5], v[:, :5], {"queries": q[:, :5]})  # fits: token by token from the start
    m.update_cache(k[:, 5:], v[:, 5:], {"queries": q[:, 5:]})
    hits = []
    for t in range(30):
        logits = k[0, : t + 1] @ q[0, t] / np.sqrt(8)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        resident = [i for i in range(t + 1) if i < 2 or i > t - 4] if t >= 6 else list(range(t + 1))
        hits.append(p[resident].sum())
    st = m.get_cache_stats()
    assert st["hit_rate_kind"] == "attention_mass" and st["hit_rate_exact"]
    assert st["hit_rate"] == pytest.approx(float(np.mean(hits)), abs=1e-5)


def test_cached_data_in_position_order():
    m = StreamingLLMScheduler(8, 16, start_size=2, num_kv_heads=2)
    k, v, _ = _data(1, 20, hidden=16)
    m.update_cache(k, v)
    keys, values = m.get_cached_data()
    want = [0, 1] + list(range(14, 20))
    np.testing.assert_allclose(np.asarray(keys), k[0, want], atol=1e-6)
    np.testing.assert_allclose(np.asarray(values), v[0, want], atol=1e-6)


def test_change_policy_resets_and_counts():
    m = LRUScheduler(8, 16)
    k, v, _ = _data(1, 10, hidden=16)
    m.update_cache(k, v)
    m.change_policy(SchedulingPolicy.H2O)
    st = m.get_cache_stats()
    assert st["policy_switches"] == 1 and st["total_updates"] == 0 and st["current_size"] == 0
    assert st["policy"] == "h2o"
    m.reset_cache()
    assert m.get_cache_stats()["policy_switches"] == 1


def test_h2o_scheduler_ratio_split():
    h = H2OScheduler(20, 16, heavy_ratio=0.3, recent_ratio=0.1)
    assert h.policy.recent_ratio == pytest.approx(0.25)
    with pytest.raises(ValueError, match="heavy_ratio"):
        H2OScheduler(20, 16, heavy_ratio=0.0, recent_ratio=0.0)


def test_bytes_are_measured():
    m = CacheSchedulingManager(8, 16, SchedulingPolicy.H2O, num_kv_heads=2)
    k, v, _ = _data(1, 10, hidden=16)
    m.update_cache(k, v)
    st = m.get_cache_stats()
    layer = m._state["layer"]
    assert st["cache_bytes"] == sum(x.nbytes for x in jax.tree_util.tree_leaves(layer))
    assert st["full_cache_bytes"] == 10 * 2 * 8 * 2 * 2


def test_errors():
    with pytest.raises(ValueError, match="cache_size"):
        CacheSchedulingManager(0, 16)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CacheSchedulingManager(8, 15, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown policy"):
        CacheSchedulingManager(8, 16, "nope")
    m = CacheSchedulingManager(8, 16)
    with pytest.raises(ValueError, match="keys"):
        m.update_cache(np.zeros((1, 3, 15)), np.zeros((1, 3, 15)))
    bad = np.zeros((1, 3, 16), np.float32)
    bad[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.update_cache(bad, np.zeros((1, 3, 16)))
    m.update_cache(np.zeros((2, 3, 16)), np.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="batch"):
        m.update_cache(np.zeros((1, 3, 16)), np.zeros((1, 3, 16)))


def test_duo_attention_scheduler_streams_every_head():
    m = DuoAttentionScheduler(10, 16, sink_size=3, num_kv_heads=2)
    k, v, _ = _data(1, 25, hidden=16)
    m.update_cache(k[:, :6], v[:, :6])
    m.update_cache(k[:, 6:], v[:, 6:], {"importance": np.ones((1, 19))})
    pos = m.get_cached_positions()[0]
    for h in range(2):
        assert sorted(pos[h][pos[h] >= 0].tolist()) == [0, 1, 2] + list(range(18, 25))
    keys, _ = m.get_cached_data()
    np.testing.assert_allclose(np.asarray(keys), k[0, [0, 1, 2] + list(range(18, 25))], atol=1e-6)
    with pytest.raises(ValueError, match="retrieval heads"):
        DuoAttentionScheduler(10, 16, pattern=((True,),))
