"""AdaKV: per-head budget allocation (hand-computed and plain-numpy truth), pooled prefill and
decode invariants on a tiny model, full-budget equivalence with the full cache, and memory."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from policy_helpers import model_trace, tiny_pikv

from pikv_jax.cache.policies import AdaKV, CachePolicy, SnapKV, init_policy_cache, make_policy
from pikv_jax.cache.policies.adakv import adaptive_keep
from pikv_jax.cache.policies.base import select_top
from pikv_jax.cache.pooled import PooledLayerCache

keep_fn = jax.jit(adaptive_keep, static_argnames=("n_sink", "window", "safe_fraction"))


# ----------------------------------------------------------------------------- allocation rule


def numpy_adaptive_keep(scores, lengths, row_budget, n_sink, window, safe_fraction):
    """Plain-numpy AdaKV selection for right-padded rows (prompt index = position)."""
    b_n, hk, s = scores.shape
    keep = np.zeros(scores.shape, bool)
    for b in range(b_n):
        L, rb = int(lengths[b]), int(row_budget[b])
        protected = [p for p in range(L) if p < n_sink or p > L - 1 - window]
        kept_prot = protected[:rb]
        m = rb - len(kept_prot)
        n_safe = math.floor(safe_fraction * m + 1e-4)
        cand = [p for p in range(L) if p not in protected]
        rest = []
        for h in range(hk):
            keep[b, h, kept_prot] = True
            order = sorted(cand, key=lambda p: (-scores[b, h, p], p))
            keep[b, h, order[:n_safe]] = True
            rest += [(h, p) for p in order[n_safe:]]
        rest.sort(key=lambda hp: (-scores[b, hp[0], hp[1]], hp[0] * s + hp[1]))
        for h, p in rest[: hk * (m - n_safe)]:
            keep[b, h, p] = True
    return keep


def _kept(keep, b, h):
    return sorted(np.nonzero(np.asarray(keep)[b, h])[0].tolist())


@pytest.mark.parametrize("safe_fraction, head0, head1", [
    (0.5, [0, 1, 2, 3, 8, 9], [0, 1, 8, 9]),     # 1 safe token each, 2 more by global top-k (both head 0)
    (0.0, [0, 1, 2, 3, 4, 8, 9], [0, 8, 9]),     # pure global top-k: head 1 keeps only its protected tokens
    (1.0, [0, 1, 2, 8, 9], [0, 1, 2, 8, 9]),     # all safe = uniform per-head budgets (SnapKV)
])
def test_allocation_hand_computed(safe_fraction, head0, head1):
    # 10 tokens, sink 1 + window 2 protected ({0, 8, 9}), row budget 5 per head -> m = 2 selectable each,
    # layer total 10. Head 0 concentrates its scores on early tokens, head 1 is flat and low.
    s0 = [0.0, 0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0]
    s1 = [0.0, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.0, 0.0]
    scores = jnp.asarray([[s0, s1]], jnp.float32)
    pos = jnp.arange(10, dtype=jnp.int32)[None]
    keep = keep_fn(scores, pos, jnp.asarray([10]), jnp.asarray([5]), n_sink=1, window=2, safe_fraction=safe_fraction)
    assert _kept(keep, 0, 0) == head0 and _kept(keep, 0, 1) == head1
    assert int(np.sum(keep)) == 2 * 5  # the layer's total budget, shared


@pytest.mark.parametrize("safe_fraction", [0.0, 0.2, 0.37, 1.0])
def test_allocation_matches_numpy(safe_fraction):
    rng = np.random.default_rng(7)
    b, hk, s = 4, 3, 24
    lengths = np.array([24, 17, 9, 5], np.int32)
    row_budget = np.array([10, 8, 9, 2], np.int32)  # row 3: budget below sinks + window (5 protected)
    scores = rng.random((b, hk, s)).astype(np.float32)
    pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1).astype(np.int32)
    keep = keep_fn(jnp.asarray(np.where(pos[:, None] >= 0, scores, -np.inf)), jnp.asarray(pos), jnp.asarray(lengths),
                   jnp.asarray(row_budget), n_sink=2, window=3, safe_fraction=safe_fraction)
    want = numpy_adaptive_keep(scores, lengths, row_budget, 2, 3, safe_fraction)
    np.testing.assert_array_equal(np.asarray(keep), want)
    np.testing.assert_array_equal(np.asarray(keep).sum(axis=(1, 2)), hk * row_budget)  # exact layer totals
    assert not np.asarray(keep)[pos[:, None, :].repeat(hk, 1) < 0].any()  # padding never kept


def test_safe_fraction_one_equals_snapkv_selection():
    rng = np.random.default_rng(3)
    b, hk, s, budget = 2, 2, 20, 8
    lengths = np.array([20, 13], np.int32)
    pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1).astype(np.int32)
    scores = jnp.asarray(np.where(pos[:, None] >= 0, rng.random((b, hk, s)), -np.inf).astype(np.float32))
    rb = np.minimum(budget, lengths)
    keep = keep_fn(scores, jnp.asarray(pos), jnp.asarray(lengths), jnp.asarray(rb), n_sink=2, window=3,
                   safe_fraction=1.0)
    idx, ok = select_top(scores, jnp.asarray(pos), jnp.asarray(lengths), budget, jnp.asarray(rb), n_sink=2, window=3)
    snap = np.zeros((b, hk, s), bool)
    np.put_along_axis(snap, np.where(ok, idx, 0), np.asarray(ok), axis=-1)
    np.testing.assert_array_equal(np.asarray(keep), snap)


# ----------------------------------------------------------------------------- tiny model


def tiny():
    return tiny_pikv(3)


def trace(policy, tokens, lengths, dec):
    """(logits0, logits [n, B, V], cache after prefill, final cache)."""
    logits0, logits, _, pre, final = model_trace(policy, tokens, lengths, dec, seed=3)
    return logits0, logits, pre, final


def _batch(seed, lengths, s, n):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 97, (len(lengths), s)).astype(np.int32)
    return tokens, np.asarray(lengths, np.int32), rng.integers(3, 97, (len(lengths), n)).astype(np.int32)


POLICY = AdaKV(budget_tokens=12, obs_window=4, n_sink=2)
S, N = 40, 5


def test_prefill_and_decode_invariants():
    cfg, _ = tiny()
    hk = cfg.num_key_value_heads
    tokens, lengths, dec = _batch(0, [40, 23, 9], S, N)
    _, logits, pre, final = trace(POLICY, tokens, lengths, dec)
    _, _, full_pre, _ = trace(CachePolicy(), tokens, lengths, dec)
    row_budget = np.minimum(12, lengths)
    for li, (layer, ref) in enumerate(zip(pre.layers, full_pre.layers)):
        assert isinstance(layer, PooledLayerCache) and layer.capacity == hk * (12 + N)
        hp = np.asarray(layer.head_positions())  # [B, Hkv, P]
        res = np.asarray(layer.resident_per_head())
        np.testing.assert_array_equal(res.sum(axis=1), hk * row_budget)  # the layer's total budget, exactly
        for b, L in enumerate(lengths):
            protected = {p for p in range(L) if p < 2 or p > L - 1 - 4}
            for h in range(hk):
                kept = hp[b, h][hp[b, h] >= 0]
                assert len(set(kept.tolist())) == len(kept), "duplicate positions in a head"
                assert protected <= set(kept.tolist()), f"layer {li} row {b} head {h}: sinks/window evicted"
                assert kept.max() < L
                if L <= 12:
                    assert set(kept.tolist()) == set(range(L))  # short row keeps everything
            # every resident entry holds the key/value of its (head, position)
            for p_slot in np.nonzero(np.asarray(layer.pos[b]) >= 0)[0]:
                h, p = int(layer.head[b, p_slot]), int(layer.pos[b, p_slot])
                np.testing.assert_allclose(layer.k[b, p_slot], ref.k[b, h, p], rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(layer.v[b, p_slot], ref.v[b, h, p], rtol=1e-6, atol=1e-6)
    # decode appends one token per head per step; nothing is evicted; the pool never overflows
    for layer_pre, layer_fin in zip(pre.layers, final.layers):
        hp0, hp1 = np.asarray(layer_pre.head_positions()), np.asarray(layer_fin.head_positions())
        for b, L in enumerate(lengths):
            for h in range(hk):
                before, after = set(hp0[b, h][hp0[b, h] >= 0].tolist()), set(hp1[b, h][hp1[b, h] >= 0].tolist())
                assert after == before | set(range(L, L + N))
        assert np.all(np.asarray(layer_fin.pos >= 0).sum(axis=1) <= layer_fin.capacity)
    assert np.all(np.isfinite(np.asarray(logits)))
    # rows are independent: other rows' prompts and lengths change nothing in row 1
    tokens2, _, dec2 = _batch(9, [40, 23, 9], S, N)
    tokens2[1], dec2[1] = tokens[1], dec[1]
    _, logits2, pre2, _ = trace(POLICY, tokens2, np.array([31, 23, 40], np.int32), dec2)
    for a, c in zip(pre.layers, pre2.layers):
        for name in ("pos", "head", "k", "v"):
            np.testing.assert_array_equal(getattr(a, name)[1], getattr(c, name)[1])
    np.testing.assert_allclose(logits[:, 1], logits2[:, 1], rtol=1e-5, atol=1e-5)


def test_memory_is_the_budget_not_the_largest_head():
    cfg, m = tiny()
    hk, d, layers = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_hidden_layers
    tokens, lengths, dec = _batch(1, [40, 37, 33], S, N)  # the shapes of the invariants test: no recompilation
    _, _, pre, _ = trace(POLICY, tokens, lengths, dec)
    b = len(lengths)
    slot_bytes = 2 * d * 4 + 3 * 4  # k, v (f32) + pos, head, score
    want = layers * b * hk * (12 + N) * slot_bytes
    assert sum(layer.nbytes() for layer in pre.layers) == want
    full = init_policy_cache(CachePolicy(), b, (S + N,) * layers, num_kv_heads=hk, head_dim=d, dtype=jnp.float32)
    full_bytes = sum(layer.nbytes() for layer in full.layers)
    assert full_bytes == layers * b * hk * (S + N) * (2 * d * 4 + 2 * 4)
    # the budget's share of the full cache, plus 4 bytes per slot for the owning-head tag
    assert want == full_bytes * (12 + N) // (S + N) * slot_bytes // (slot_bytes - 4)
    # heads do get different budgets; a uniform layout holding this selection needs the largest head's count
    most = max(int(np.asarray(layer.resident_per_head()).max()) for layer in pre.layers)
    assert most > 12
    uniform_needed = layers * b * hk * (most + N) * (2 * d * 4 + 2 * 4)
    assert want < uniform_needed
    # the same in real generation (PiKVModel.generate): bytes reported honestly, less than the full cache
    prompts, _ = prompts_and_continuations()
    out = m.generate(prompts, 6, policy=make_policy("adakv", budget_ratio=0.25, obs_window=4, n_sink=2), stop_ids=())
    ref = m.generate(prompts, 6, stop_ids=())
    assert out.stats["cache_bytes"] < ref.stats["cache_bytes"] / 2
    assert [len(t) for t in out.token_ids] == [6, 6]


def prompts_and_continuations():
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 97, n).tolist() for n in (30, 17)]
    return prompts, [rng.integers(3, 97, 6).tolist() for _ in prompts]


def test_whole_budget_reproduces_full_cache():
    _, m = tiny()
    prompts, conts = prompts_and_continuations()
    # budget_tokens = longest prompt < padded length 64: the selection path runs and keeps every token
    policy = AdaKV(budget_tokens=30, obs_window=4, n_sink=2)
    assert not policy.keeps_whole_prompt(64)
    full, ada = m.generate(prompts, 6, stop_ids=()), m.generate(prompts, 6, policy=policy, stop_ids=())
    assert ada.token_ids == full.token_ids
    lp_full, _ = m.teacher_forced(prompts, conts, full_logprobs=True)
    lp_ada, _ = m.teacher_forced(prompts, conts, policy=policy, full_logprobs=True)
    np.testing.assert_allclose(lp_ada, lp_full, rtol=1e-5, atol=1e-5)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="safe_fraction"):
        AdaKV(budget_ratio=0.5, safe_fraction=1.5)
    with pytest.raises(ValueError, match="decode_evict"):
        AdaKV(budget_ratio=0.5, decode_evict=True)
    with pytest.raises(ValueError, match="obs_window"):
        AdaKV(budget_ratio=0.5, obs_window=0)
    p = make_policy("adakv", budget_ratio=0.25)
    assert isinstance(p, AdaKV) and isinstance(p, SnapKV) and p.safe_fraction == 0.2 and p.window == 64
    assert hash(p) == hash(make_policy("adakv", budget_ratio=0.25))
