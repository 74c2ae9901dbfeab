"""The manager's hit rate against an independent NumPy reference, for every SchedulingPolicy member.

Reference: for each decode step t with query q_t, the softmax of q_t over every token seen so far
(exact full attention, computed here from the raw keys), summed over the tokens the policy serves
after the step (the resident positions the manager reports; for Quest the slots of the pages that
Quest's rule selects, recomputed here from page min / max bounds), averaged over the query heads of
each KV head, then KV heads, rows and steps.
"""

import numpy as np
import pytest

from pikv_jax.cache.policies import POLICIES
from pikv_jax.scheduling import MODEL_ONLY, CacheSchedulingManager, QUESTScheduler, SchedulingPolicy, manager_policy

CACHE, HIDDEN, HKV, H = 8, 8, 2, 4
D, G = HIDDEN // HKV, H // HKV
PAGE, TOKEN_BUDGET = 2, 4  # Quest: pages of 2 slots, max(3, 4 // 2) = 3 pages attended


def _data(seed, b, s):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(b, s, HIDDEN)).astype(np.float32)
    v = rng.normal(size=(b, s, HIDDEN)).astype(np.float32)
    q = (2.0 * rng.normal(size=(b, s, H * D))).astype(np.float32)
    return k, v, q


def _manager(policy, **kw):
    opts = dict(page_size=PAGE, token_budget=TOKEN_BUDGET) if policy is SchedulingPolicy.QUEST else {}
    return CacheSchedulingManager(CACHE, HIDDEN, policy, num_kv_heads=HKV, num_heads=H, **kw, **opts)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _quest_pages(slot_pos, keys_by_pos, q, t):
    """Slots Quest attends for one (row, KV head): q [G, D]; slot_pos [C] (-1 empty)."""
    n_pages = len(slot_pos) // PAGE
    bound, nonempty, newest = np.full(n_pages, -np.inf), np.zeros(n_pages, bool), -1
    for p in range(n_pages):
        live = [int(x) for x in slot_pos[p * PAGE:(p + 1) * PAGE] if x >= 0]
        if not live:
            continue
        kk = keys_by_pos[live]
        lo, hi = kk.min(axis=0), kk.max(axis=0)
        bound[p] = np.max(np.sum(np.maximum(q * lo, q * hi), axis=-1))  # max over the GQA group
        nonempty[p] = True
        newest = p if t in live else newest
    n_sel = min(max(3, TOKEN_BUDGET // PAGE), n_pages)
    others = [p for p in np.argsort(-bound, kind="stable") if nonempty[p] and p != newest]
    chosen = ([newest] if newest >= 0 else []) + others[: n_sel - (newest >= 0)]
    return {int(slot_pos[s]) for p in chosen for s in range(p * PAGE, (p + 1) * PAGE) if slot_pos[s] >= 0}


def _reference_hit(k, q, t, positions, quest):
    """Mean over rows and KV heads of step t's hit, from the positions reported after the step."""
    hits = []
    for b in range(k.shape[0]):
        for h in range(HKV):
            keys = k[b, : t + 1, h * D:(h + 1) * D]
            qg = q[b, t].reshape(H, D)[h * G:(h + 1) * G]
            p = _softmax(qg @ keys.T / np.sqrt(D))  # [G, t + 1]
            row = positions[b, h]
            served = _quest_pages(row, keys, qg, t) if quest else {int(x) for x in row if x >= 0}
            hits.append(p[:, sorted(served)].sum(axis=-1).mean())
    return float(np.mean(hits))


def test_every_registered_policy_has_a_member():
    """Every policy a manager can run has a member; the model-only ones are refused clearly."""
    assert set(POLICIES) - set(MODEL_ONLY) <= {m.value for m in SchedulingPolicy}
    assert set(MODEL_ONLY) <= set(POLICIES)
    for name in ("QUEST", "ADAKV", "DUOATTENTION"):
        assert SchedulingPolicy[name].value in POLICIES
    for name in MODEL_ONLY:
        with pytest.raises(ValueError, match=f"policy '{name}' scores tokens with the model's own passes"):
            manager_policy(name, 16)


@pytest.mark.parametrize("policy", list(SchedulingPolicy), ids=lambda p: p.name)
@pytest.mark.parametrize("first", [0, 12], ids=["decode_only", "prefill_chunk"])
def test_hit_rate_matches_numpy(policy, first):
    """Optionally a first chunk larger than the cache (compressed by the prefill rule; its queries
    are not counted), then single tokens, each through the decode path."""
    b, s = 2, max(first, 8) + 6
    k, v, q = _data(1, b, s)
    m = _manager(policy, hit_window=32)
    if first:
        m.update_cache(k[:, :first], v[:, :first], {"queries": q[:, :first]})
    want = []
    for t in range(first, s):
        m.update_cache(k[:, t:t + 1], v[:, t:t + 1], {"queries": q[:, t:t + 1]})
        pos = m.get_cached_positions()
        if policy in (SchedulingPolicy.NONE, SchedulingPolicy.STREAMING_LLM, SchedulingPolicy.DUOATTENTION):
            known = set(range(t + 1)) if t < CACHE else set(range(4)) | set(range(t - CACHE + 5, t + 1))
            assert all({int(x) for x in pos[r, h] if x >= 0} == known for r in range(b) for h in range(HKV))
        want.append(_reference_hit(k, q, t, pos, policy is SchedulingPolicy.QUEST))
    st = m.get_cache_stats()
    assert st["hit_rate_kind"] == "attention_mass" and st["hit_rate_exact"]
    assert st["hit_rate_steps"] == b * len(want)
    assert st["hit_rate"] == pytest.approx(float(np.mean(want)), abs=2e-5)


def test_quest_hit_rate_reflects_selected_pages():
    """Quest serves fewer tokens than it holds: its hit rate is below the resident-set share."""
    k, v, q = _data(2, 1, 24)
    quest = QUESTScheduler(16, HIDDEN, num_kv_heads=HKV, num_heads=H, page_size=2, token_budget=4, hit_window=32)
    full = CacheSchedulingManager(16, HIDDEN, SchedulingPolicy.STREAMING_LLM, num_kv_heads=HKV, num_heads=H,
                                  hit_window=32)
    for m in (quest, full):
        m.update_cache(k[:, :10], v[:, :10], {"queries": q[:, :10]})
        m.update_cache(k[:, 10:], v[:, 10:], {"queries": q[:, 10:]})
        assert m.get_cache_stats()["hit_rate_kind"] == "attention_mass"
    np.testing.assert_array_equal(np.sort(quest.get_cached_positions(), -1), np.sort(full.get_cached_positions(), -1))
    assert quest.get_cache_stats()["hit_rate"] < full.get_cache_stats()["hit_rate"] - 0.05


def test_hit_rate_beyond_the_window_uses_the_last_evicted_tokens():
    """Default hit_window = cache_size: the softmax runs over the resident tokens plus the last
    cache_size evicted ones (an upper bound of the exact share, flagged as not exact)."""
    cache, sinks, s = 6, 2, 30
    k, v, _ = _data(3, 1, s)
    q = np.random.default_rng(4).normal(size=(1, s, 8)).astype(np.float32) * 2
    m = CacheSchedulingManager(cache, 8, SchedulingPolicy.STREAMING_LLM, n_sink=sinks)
    for lo, hi in ((0, 5), (5, s)):  # a first chunk that fits: every token goes through the decode path
        m.update_cache(k[:, lo:hi], v[:, lo:hi], {"queries": q[:, lo:hi]})
    hits = []
    for t in range(s):
        resident = [i for i in range(t + 1) if i < sinks or i > t - (cache - sinks)]
        evicted = [i for i in range(sinks, t + 1) if i not in resident][-cache:]
        seen = resident + evicted
        p = _softmax(k[0, seen] @ q[0, t] / np.sqrt(8))
        hits.append(p[: len(resident)].sum())
    st = m.get_cache_stats()
    assert st["hit_rate_kind"] == "attention_mass" and not st["hit_rate_exact"]
    assert st["hit_rate"] == pytest.approx(float(np.mean(hits)), abs=1e-5)


@pytest.mark.parametrize("policy", list(SchedulingPolicy), ids=lambda p: p.name)
def test_every_member_builds_and_reports_a_number(policy):
    """hit_rate is a number for every policy, before any update, without queries and with them;
    the guide's f-string formats it."""
    k, v, q = _data(5, 1, 20)
    m = _manager(policy)
    assert f"{m.get_cache_stats()['hit_rate']:.2f}" == "0.00"
    m.update_cache(k[:, :12], v[:, :12])
    m.update_cache(k[:, 12:16], v[:, 12:16], metadata={"layer_idx": 0})
    st = m.get_cache_stats()
    assert st["hit_rate_kind"] == "residency" and isinstance(st["hit_rate"], float)
    resident = (m.get_cached_positions() >= 0).sum(-1)
    assert st["hit_rate"] == pytest.approx(float(np.mean(resident / 16)))
    assert f"{st['hit_rate']:.2f}"
    m.update_cache(k[:, 16:], v[:, 16:], {"queries": q[:, 16:]})
    st = m.get_cache_stats()
    assert st["hit_rate_kind"] == "attention_mass" and 0.0 < st["hit_rate"] <= 1.0
    assert ((m.get_cached_positions() == 19).any(-1)).all()
