"""Exact small cases of each policy's scoring rule, on hand-made tensors, against plain NumPy (or
hand-computed) truth: SnapKV's observation window, pooling and top-k; H2O's accumulation (and its
normalize option); LRU's "used" rule and tie-break; TOVA's head mean of the last query; Knorm and
KeyDiff orderings; PyramidKV's per-layer budgets; StreamingLLM's kept set; evict_every; and
`select_top` (protected tokens first, per-row budgets on ragged rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import policy_helpers as ph
import pytest

from pikv_jax.attention import reference
from pikv_jax.cache.policies import H2O, LRU, TOVA, CachePolicy, KeyDiff, Knorm, PyramidKV, SnapKV, StreamingLLM
from pikv_jax.cache.policies.base import PrefillContext, protected_mask, select_top
from pikv_jax.cache.policies.scoring import avg_pool, lexicographic_argmin, max_pool, window_probs
from pikv_jax.cache.state import LayerCache, init_layer_cache


def ctx_from(q, k, lengths, key_mass=None):
    """A PrefillContext over right-padded q [B, S, H, D], k [B, S, Hkv, D] (v = k)."""
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    lengths = np.asarray(lengths, np.int32)
    s = k.shape[1]
    pos = np.where(np.arange(s)[None, :] < lengths[:, None], np.arange(s)[None, :], -1).astype(np.int32)
    return PrefillContext(q=jnp.asarray(q), k=jnp.asarray(k), v=jnp.asarray(k), pos=jnp.asarray(pos),
                          lengths=jnp.asarray(lengths), key_mass=key_mass, shared={})


def random_qk(seed, b=2, s=10, h=4, hk=2, d=8, scale=1.5):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, scale, (b, s, h, d)).astype(np.float32),
            rng.normal(0, scale, (b, s, hk, d)).astype(np.float32))


def np_probs(q, k, qi, length, h, group):
    """Softmax of query qi (head h) over keys 0..qi of a row (float64)."""
    d = q.shape[-1]
    logits = k[: qi + 1, h // group] @ q[qi, h] / math.sqrt(d)
    p = np.exp(logits - logits.max())
    out = np.zeros(k.shape[0])
    out[: qi + 1] = p / p.sum()
    return out


def np_reduce(x, how, axis):
    return {"mean": np.mean, "max": np.max, "sum": np.sum}[how](x, axis=axis)


def np_window_probs(q, k, lengths, w, how="mean"):
    b, s, h, _ = q.shape
    hk = k.shape[2]
    g = h // hk
    w = min(w, s)
    out = np.zeros((b, hk, w, s))
    qpos = np.full((b, w), -1)
    for r in range(b):
        for i in range(w):
            qi = lengths[r] - w + i
            if qi < 0:
                continue
            qpos[r, i] = qi
            per_head = np.stack([np_probs(q[r].astype(np.float64), k[r].astype(np.float64), qi, lengths[r], j, g)
                                 for j in range(h)])  # [H, S]
            out[r, :, i] = np_reduce(per_head.reshape(hk, g, s), how, axis=1)
    return out, qpos


def np_avg_pool(x, kernel):
    pad = kernel // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return np.stack([xp[..., i: i + kernel].sum(-1) / kernel for i in range(x.shape[-1])], axis=-1)


def layer_cache(pos, score, *, k=None, d=4):
    pos = np.asarray(pos, np.int32)
    k = np.zeros(pos.shape + (d,), np.float32) if k is None else np.asarray(k, np.float32)
    return LayerCache(k=jnp.asarray(k), v=jnp.asarray(k), pos=jnp.asarray(pos),
                      score=jnp.asarray(np.asarray(score, np.float32)))


# ------------------------------------------------------------------------------ pooling, windows


def test_avg_pool_is_zero_padded_and_counts_the_padding():
    x = np.array([[5.0, 0, 0, 0, 0, 0, 10.0]], np.float32)
    # kernel 5, zero padding of 2, always divided by 5 (count_include_pad)
    np.testing.assert_allclose(np.asarray(avg_pool(jnp.asarray(x), 5)), [[1, 1, 1, 0, 2, 2, 2]], atol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 11)).astype(np.float32)
    for kernel in (1, 3, 5, 7):
        np.testing.assert_allclose(np.asarray(avg_pool(jnp.asarray(x), kernel)), np_avg_pool(x, kernel), atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        avg_pool(jnp.asarray(x), 4)


def test_max_pool_never_picks_the_padding():
    x = np.array([[-3.0, -1.0, -2.0, -5.0, -4.0]], np.float32)
    np.testing.assert_allclose(np.asarray(max_pool(jnp.asarray(x), 3)), [[-1, -1, -1, -2, -4]])


@pytest.mark.parametrize("how", ["mean", "max", "sum"])
def test_window_probs_is_causal_inside_the_window(how):
    q, k = random_qk(1)
    lengths = np.array([10, 2])  # the second row is shorter than the window
    probs, qpos = window_probs(ctx_from(q, k, lengths), 4, how)
    want, want_pos = np_window_probs(q, k, lengths, 4, how)
    np.testing.assert_array_equal(np.asarray(qpos), want_pos)
    np.testing.assert_allclose(np.asarray(probs), want, rtol=1e-5, atol=1e-6)
    probs = np.asarray(probs)
    for r, L in enumerate(lengths):
        for i, p in enumerate(want_pos[r]):
            assert np.all(probs[r, :, i, p + 1:] == 0), "a window query sees a later key"
            if p < 0:
                assert np.all(probs[r, :, i] == 0), "window slots before the row's start are empty"
            elif how == "mean":
                np.testing.assert_allclose(probs[r, :, i].sum(-1), 1.0, rtol=1e-5)


def test_snapkv_scores_pool_the_window_mean_and_keep_the_top_k():
    q, k = random_qk(2, s=12)
    lengths = np.array([12, 9])
    w, kernel, budget = 3, 5, 7
    policy = SnapKV(obs_window=w, kernel=kernel, budget_tokens=budget, n_sink=1)
    ctx = ctx_from(q, k, lengths)
    scores = np.asarray(policy.prefill_scores(0, ctx))
    probs, qpos = np_window_probs(q, k, lengths, w)
    mean = probs.sum(2) / np.maximum((qpos >= 0).sum(-1), 1)[:, None, None]
    want = np_avg_pool(mean, kernel)
    for r, L in enumerate(lengths):
        np.testing.assert_allclose(scores[r, :, :L], want[r, :, :L], rtol=1e-5, atol=1e-7)
        assert np.all(scores[r, :, L:] == -np.inf), "padding must never be selected"
    # top-k: sinks + observation window first, then the best pooled scores
    rb = np.asarray(policy.row_budget(0, ctx.lengths, 12))
    idx, ok = select_top(jnp.asarray(scores), ctx.pos, ctx.lengths, budget, jnp.asarray(rb), n_sink=1,
                         window=policy.recent_window(budget))
    idx, ok = np.asarray(idx), np.asarray(ok)
    for r, L in enumerate(lengths):
        for h in range(k.shape[2]):
            prot = {0} | set(range(L - w, L))
            rest = [p for p in np.argsort(-want[r, h, :L], kind="stable") if p not in prot]
            expect = prot | set(int(p) for p in rest[: budget - len(prot)])
            assert set(idx[r, h][ok[r, h]].tolist()) == expect


# ---------------------------------------------------------------------------------------------- H2O


def test_h2o_prefill_scores_are_column_sums_over_every_query():
    q, k = random_qk(3, s=9)
    lengths = np.array([9, 6])
    pos = np.where(np.arange(9)[None] < lengths[:, None], np.arange(9)[None], -1)
    _, mass = reference.chunk_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k), jnp.asarray(pos),
                                        jnp.asarray(pos), mass_from=H2O().prefill_mass_from(jnp.asarray(lengths)))
    want = np.zeros((2, 2, 9))
    for r, L in enumerate(lengths):
        for qi in range(L):
            per_head = np.stack([np_probs(q[r].astype(np.float64), k[r].astype(np.float64), qi, L, j, 2)
                                 for j in range(4)])
            want[r] += per_head.reshape(2, 2, 9).mean(1)
    np.testing.assert_allclose(np.asarray(mass), want, rtol=1e-5, atol=1e-6)
    ctx = ctx_from(q, k, lengths, key_mass=mass)
    np.testing.assert_allclose(np.asarray(H2O().prefill_scores(0, ctx)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(H2O().initial_scores(0, ctx)), want, rtol=1e-5, atol=1e-6)
    # normalize: divided by the number of queries that could see the token (L - p)
    norm = np.asarray(H2O(normalize=True).prefill_scores(0, ctx))
    for r, L in enumerate(lengths):
        np.testing.assert_allclose(norm[r, :, :L], want[r, :, :L] / (L - np.arange(L)), rtol=1e-5)


def test_h2o_observe_adds_each_steps_mass_and_normalize_divides_by_observers():
    cache = layer_cache([[[0, 1, 2, 5, -1]], [[0, 3, 4, -1, -1]]], [[[1.0, 2.0, 0.5, 0.0, 0.0]], [[3.0] * 5]])
    mass = jnp.asarray([[[0.1, 0.2, 0.3, 0.4, 0.0]], [[0.5, 0.25, 0.25, 0.0, 0.0]]], jnp.float32)
    active = jnp.asarray([True, False])
    out = H2O().observe(0, cache, mass, jnp.asarray([6, 5]), active)
    np.testing.assert_allclose(np.asarray(out.score), [[[1.1, 2.2, 0.8, 0.4, 0.0]], [[3.0] * 5]], rtol=1e-6)
    ev = np.asarray(H2O(normalize=True).eviction_scores(0, out, jnp.asarray([6, 5])))
    np.testing.assert_allclose(ev[0, 0, :4], np.array([1.1, 2.2, 0.8, 0.4]) / np.array([7, 6, 5, 2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(H2O().eviction_scores(0, out, jnp.asarray([6, 5]))), np.asarray(out.score))


def test_h2o_score_in_the_model_is_prefill_column_sums_plus_every_decode_step():
    """Through prefill + 4 decode steps of the tiny model, without eviction (budget = whole prompt,
    decode_evict off): each cached token's score equals the attention it received from every query
    of the uncached forward (prompt and decoded), reduced over its GQA group, in every layer."""
    s, n = 10, 4
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 97, (2, s))
    lengths = np.array([10, 7])
    dec = rng.integers(3, 97, (2, n))
    policy = H2O(budget_tokens=s, decode_evict=False)
    out = ph.run_trace(policy, tokens, lengths, dec)
    _, _, _, qs = ph.uncached_kv(tokens, lengths, dec)
    ks = ph.uncached_kv(tokens, lengths, dec)[0]
    final = ph.step_snapshot(out[4], n - 1)
    for layer in range(ph.NUM_LAYERS):
        for r, L in enumerate(lengths):
            q64, k64 = qs[layer][r].astype(np.float64), ks[layer][r].astype(np.float64)
            t = L + n
            want = np.zeros((2, q64.shape[0]))
            for qi in range(t):
                want += np.stack([np_probs(q64, k64, qi, t, j, 2) for j in range(4)]).reshape(2, 2, -1).mean(1)
            pos, score = final["pos"][layer][r], final["score"][layer][r]
            for h in range(2):
                got = {int(p): score[h, c] for c, p in enumerate(pos[h]) if p >= 0}
                assert sorted(got) == list(range(t))
                np.testing.assert_allclose([got[p] for p in range(t)], want[h, :t], rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- LRU


def test_lru_marks_tokens_at_or_above_uniform_mass_as_used():
    cache = layer_cache([[[0, 1, 2, 3, -1]], [[0, 1, -1, -1, -1]]], [[[0.0, 1.0, 2.0, 3.0, 0.0]], [[7.0] * 5]])
    mass = jnp.asarray([[[0.3, 0.25, 0.2, 0.25, 0.0]], [[0.9, 0.1, 0.0, 0.0, 0.0]]], jnp.float32)
    out = LRU().observe(0, cache, mass, jnp.asarray([9, 9]), jnp.asarray([True, False]))
    # row 0: 4 tokens -> used iff mass >= 1/4; row 1 inactive
    np.testing.assert_array_equal(np.asarray(out.score), [[[9.0, 9.0, 2.0, 9.0, 0.0]], [[7.0] * 5]])
    np.testing.assert_array_equal(np.asarray(LRU().new_token_score(0, jnp.zeros((2, 1, 4)), jnp.asarray([9, 4]))),
                                  [[9.0], [4.0]])


def test_lru_evicts_the_least_recent_use_and_breaks_ties_by_oldest_position():
    cache = layer_cache([[[10, 8, 6, 12, 3]]], [[[5.0, 3.0, 3.0, 7.0, 3.0]]])
    policy = LRU(n_sink=0, budget_tokens=5)
    # last use 3 for positions 8, 6, 3: the oldest (3, slot 4) goes first
    assert int(policy.victim(0, cache, jnp.asarray([13]))[0, 0]) == 4
    # protect position 3 as a sink: then 6 (slot 2)
    assert int(LRU(n_sink=4, budget_tokens=5).victim(0, cache, jnp.asarray([13]))[0, 0]) == 2
    assert int(lexicographic_argmin(jnp.asarray([2.0, 1.0, 1.0]), jnp.asarray([0, 9, 4]))) == 2


def test_lru_prefill_score_is_the_last_window_query_that_used_the_token():
    q, k = random_qk(5, s=8)
    lengths = np.array([8, 5])
    w = 3
    scores = np.asarray(LRU(observe_window=w).prefill_scores(0, ctx_from(q, k, lengths)))
    probs, qpos = np_window_probs(q, k, lengths, w)
    for r, L in enumerate(lengths):
        for h in range(2):
            for p in range(L):
                uses = [qpos[r, i] for i in range(w) if qpos[r, i] >= 0 and probs[r, h, i, p] >= 1 / (qpos[r, i] + 1)]
                assert scores[r, h, p] == max(uses + [p]), (r, h, p)


# --------------------------------------------------------------------------------------------- TOVA


def test_tova_prefill_ranks_by_the_last_querys_attention_averaged_over_all_heads():
    q, k = random_qk(6, s=7)
    lengths = np.array([7, 4])
    scores = np.asarray(TOVA().prefill_scores(0, ctx_from(q, k, lengths)))
    for r, L in enumerate(lengths):
        per_head = np.stack([np_probs(q[r].astype(np.float64), k[r].astype(np.float64), L - 1, L, j, 2)
                             for j in range(4)])
        want = per_head.mean(0)  # every query head of the layer
        for h in range(2):
            np.testing.assert_allclose(scores[r, h, :L], want[:L], rtol=1e-5, atol=1e-7)


def test_tova_observe_replaces_scores_by_the_head_mean():
    cache = layer_cache(np.tile([[[0, 1, 2]]], (1, 2, 1)), np.full((1, 2, 3), 9.0))
    mass = jnp.asarray([[[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]], jnp.float32)
    out = TOVA().observe(0, cache, mass, jnp.asarray([2]), jnp.asarray([True]))
    np.testing.assert_allclose(np.asarray(out.score), [[[0.4, 0.2, 0.4]] * 2], rtol=1e-6)
    assert int(TOVA(n_sink=0, budget_tokens=3).victim(0, out, jnp.asarray([9]))[0, 0]) == 1


# ------------------------------------------------------------------------------------ Knorm, KeyDiff


def test_knorm_keeps_low_norm_keys_and_evicts_the_largest():
    norms = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 0.5])
    rng = np.random.default_rng(7)
    u = rng.normal(size=(6, 4))
    k = (u / np.linalg.norm(u, axis=-1, keepdims=True) * norms[:, None])[None, :, None, :]  # [1, 6, 1, 4]
    ctx = ctx_from(np.zeros((1, 6, 1, 4)), k, [6])
    policy = Knorm(n_sink=0, budget_tokens=3)
    scores = np.asarray(policy.prefill_scores(0, ctx))
    np.testing.assert_allclose(scores[0, 0], -norms, rtol=1e-5)
    idx, ok = select_top(jnp.asarray(scores), ctx.pos, ctx.lengths, 3, jnp.asarray([3]), n_sink=0, window=0)
    assert set(np.asarray(idx)[0, 0].tolist()) == {1, 2, 5} and np.asarray(ok).all()
    np.testing.assert_allclose(np.asarray(policy.new_token_score(0, jnp.asarray(k[:, 3]), jnp.asarray([6]))), [[-5.0]],
                               rtol=1e-5)
    cache = layer_cache(np.arange(6)[None, None], -norms[None, None])
    assert int(policy.victim(0, cache, jnp.asarray([9]))[0, 0]) == 3  # norm 5


def test_keydiff_keeps_keys_far_from_the_mean_key():
    k = np.array([[1.0, 0.0], [1.0, 0.2], [0.9, -0.1], [0.0, 1.0], [-1.0, 0.3], [0.5, 0.5]])
    ctx = ctx_from(np.zeros((1, 6, 1, 2)), k[None, :, None, :], [6])
    scores = np.asarray(KeyDiff(n_sink=0).prefill_scores(0, ctx))[0, 0]
    mean = k.mean(0)
    cos = k @ mean / (np.linalg.norm(k, axis=-1) * np.linalg.norm(mean))
    np.testing.assert_allclose(scores, -cos, rtol=1e-5, atol=1e-6)
    idx, _ = select_top(jnp.asarray(scores[None, None]), ctx.pos, ctx.lengths, 2, jnp.asarray([2]), n_sink=0,
                        window=0)
    assert set(np.asarray(idx)[0, 0].tolist()) == set(np.argsort(cos)[:2].tolist()) == {3, 4}


# ---------------------------------------------------------------------------------------- PyramidKV


def _paper_pyramid(budget, window, num_layers, beta=20.0):
    """PyramidKV's budgets (min = m / beta, max = 2m - min, linear in depth), unrounded."""
    m = budget - window
    lo, hi = m / beta, 2 * m - m / beta
    return [window + hi - l * (hi - lo) / (num_layers - 1) for l in range(num_layers)]


@pytest.mark.parametrize("num_layers,budget,obs,n_sink", [(8, 100, 8, 0), (5, 64, 16, 4), (30, 256, 64, 4)])
def test_pyramidkv_budgets_decrease_and_average_the_target(num_layers, budget, obs, n_sink):
    p = PyramidKV(num_layers=num_layers, budget_tokens=budget, obs_window=obs, n_sink=n_sink)
    got = [p.layer_budget(l, 4096) for l in range(num_layers)]
    assert all(a >= b for a, b in zip(got, got[1:])) and got[0] > got[-1]
    assert sum(got) == budget * num_layers  # the average is the target, exactly
    # the paper's formula with beta = 20, the fixed part being every protected token
    want = _paper_pyramid(budget, n_sink + obs, num_layers)
    assert all(abs(g - w) <= 0.5 for g, w in zip(got, want)), (got, want)
    assert min(got) > n_sink + obs, "every layer keeps its sinks, its window and at least one selected token"
    # ragged rows: each row's budgets follow the same shape on its own base budget
    lengths = jnp.asarray([4096, 300, 40])
    for l in range(num_layers):
        rb = np.asarray(p.row_budget(l, lengths, 4096))
        assert rb[0] == got[l]
        for row, L in ((1, 300), (2, 40)):
            base = min(budget, L)
            fixed = min(n_sink + obs, base)
            want = min(L, fixed + max(1, round((base - fixed) * p.layer_fraction(l))))
            assert abs(int(rb[row]) - want) <= 1  # row budgets round in float32, x.5 cases may go either way


def test_pyramidkv_matches_the_paper_without_sinks_and_with_one_layer():
    p = PyramidKV(num_layers=4, budget_tokens=128, obs_window=8, n_sink=0)
    m = 120
    assert [p.layer_budget(l, 1000) for l in range(4)] == [8 + round(m * f) for f in
                                                        (2 - 1 / 20, 2 - 1 / 20 - (2 - 2 / 20) / 3,
                                                         2 - 1 / 20 - 2 * (2 - 2 / 20) / 3, 1 / 20)]
    assert PyramidKV(num_layers=1, budget_tokens=50, obs_window=8).layer_budget(0, 1000) == 50
    ratio = PyramidKV(num_layers=4, budget_ratio=0.25, obs_window=8, n_sink=0)
    assert ratio.layer_budget(0, 400) == 8 + round(92 * 1.95)


# ------------------------------------------------------------------------------------ StreamingLLM


def test_streaming_llm_keeps_sinks_and_the_most_recent_tokens():
    budget, n_sink, s, n = 8, 2, 16, 6
    rng = np.random.default_rng(9)
    tokens, lengths, dec = rng.integers(3, 97, (2, s)), np.array([16, 11]), rng.integers(3, 97, (2, n))
    out = ph.run_trace(StreamingLLM(budget_tokens=budget, n_sink=n_sink), tokens, lengths, dec)
    snaps = [out[3]] + [ph.step_snapshot(out[4], t) for t in range(n)]
    for t, snap in enumerate(snaps):
        for r, L in enumerate(lengths):
            seen = L + t
            want = set(range(n_sink)) | set(range(seen - (budget - n_sink), seen))
            for layer in range(ph.NUM_LAYERS):
                for h in range(2):
                    assert set(ph.resident_sets(snap, layer, r, h)) == want, (t, r, layer, h)


# -------------------------------------------------------------------------------------- evict_every


@pytest.mark.parametrize("cls", [H2O, Knorm, StreamingLLM, TOVA, LRU])
def test_evict_every_adds_n_minus_one_slots(cls):
    for n in (1, 2, 5):
        p = cls(budget_tokens=20, n_sink=2, evict_every=n, decode_evict=True)
        assert p.capacity_for(0, 64, 100) == 20 + n - 1


def test_prefill_only_policies_refuse_decode_eviction():
    with pytest.raises(ValueError, match="compose it with a decode-time policy"):
        SnapKV(budget_tokens=20, obs_window=4, decode_evict=True)


@jax.jit
def _evict_step(cache, q_pos):
    policy = CachePolicy(budget_tokens=4, n_sink=1, window=1, evict_every=3, decode_evict=True)
    cache, slot, ok = policy.decode_slot(0, cache, q_pos)
    k = jnp.ones((1, 1, 4))
    return policy.write(0, cache, k, k, q_pos, slot, jnp.ones((1,), bool)), slot


def test_evict_every_frees_the_n_lowest_unprotected_slots_at_once():
    # capacity 4 + 3 - 1 = 6; position 0 is a sink; the window (1) is the new token itself
    cache = layer_cache([[[0, 1, 2, 3, 4, 5]]], [[[0.1, 1.0, 5.0, 0.5, 7.0, 3.0]]])
    cache, slot = _evict_step(cache, jnp.asarray([6]))
    assert int(slot[0, 0]) == 3  # the lowest unprotected score: the new token's slot
    np.testing.assert_array_equal(np.asarray(cache.pos)[0, 0], [0, -1, 2, 6, 4, -1])  # slots 1 and 5 freed too
    cache, slot = _evict_step(cache, jnp.asarray([7]))  # free slots left: no eviction
    np.testing.assert_array_equal(np.asarray(cache.pos)[0, 0], [0, 7, 2, 6, 4, -1])
    cache, slot = _evict_step(cache, jnp.asarray([8]))
    np.testing.assert_array_equal(np.asarray(cache.pos)[0, 0], [0, 7, 2, 6, 4, 8])
    cache, slot = _evict_step(cache, jnp.asarray([9]))  # full again: 3 freed (scores 0 of 7, 6, 8), 4 resident
    assert (np.asarray(cache.pos) >= 0).sum() == 4


# ------------------------------------------------------------------------------------------ select_top


def test_select_top_puts_protected_tokens_first_and_respects_ragged_row_budgets():
    s = 8
    lengths = jnp.asarray([8, 5, 2])
    pos = jnp.where(jnp.arange(s)[None] < lengths[:, None], jnp.arange(s)[None], -1)
    scores = jnp.asarray(np.array([[9, 1, 8, 7, 2, 3, -50, -60],
                                   [1, 9, 8, -70, -80, 0, 0, 0],
                                   [1, 2, 0, 0, 0, 0, 0, 0]], np.float32)[:, None, :])
    row_budget = jnp.asarray([5, 3, 2])
    idx, ok = select_top(scores, pos, lengths, 5, row_budget, n_sink=1, window=2)
    idx, ok = np.asarray(idx)[:, 0], np.asarray(ok)[:, 0]
    # row 0: protected {0, 6, 7} ranked first despite low scores, then the best two others (2: 8, 3: 7)
    assert set(idx[0, :3].tolist()) == {0, 6, 7} and idx[0, 3:].tolist() == [2, 3] and ok[0].all()
    # row 1 (length 5, budget 3): exactly its protected tokens {0, 3, 4}; the rest not ok
    assert set(idx[1][ok[1]].tolist()) == {0, 3, 4} and ok[1].tolist() == [True] * 3 + [False] * 2
    # row 2 (length 2): its two tokens, never padding
    assert set(idx[2][ok[2]].tolist()) == {0, 1} and ok[2].sum() == 2


def test_select_top_keeps_sinks_then_the_newest_tokens_when_the_budget_is_short():
    """A short row under a ratio budget can have fewer slots than sinks + window: it keeps its sinks
    and its newest tokens (the end of the prompt, e.g. the question), never the oldest window tokens."""
    s = 16
    lengths = jnp.asarray([10, 16, 3])
    pos = jnp.where(jnp.arange(s)[None] < lengths[:, None], jnp.arange(s)[None], -1)
    scores = jnp.asarray(np.random.default_rng(0).random((3, 1, s)), jnp.float32)
    idx, ok = select_top(scores, pos, lengths, 14, jnp.asarray([5, 14, 2]), n_sink=4, window=8)
    kept = [sorted(np.asarray(idx)[r, 0][np.asarray(ok)[r, 0]].tolist()) for r in range(3)]
    assert kept[0] == [0, 1, 2, 3, 9]  # 4 sinks + the newest; positions 4..8 of the window go first
    assert kept[1][:4] == [0, 1, 2, 3] and kept[1][-8:] == list(range(8, 16)) and len(kept[1]) == 14
    assert kept[2] == [0, 1]  # fewer slots than sinks: the first sinks
    # through a policy: SnapKV with a ratio budget on a prompt shorter than its observation window
    q, k = random_qk(8, b=1, s=16)
    # a 6-token row is shorter than (n_sink + obs_window) / ratio = 12 tokens: too short to compress,
    # it is kept whole (base.py, "short prompts")
    policy = SnapKV(budget_ratio=0.5, obs_window=4, n_sink=2)
    ctx = ctx_from(q, k, [6])
    cache = policy.prefill(0, init_layer_cache(1, 2, 8, 8, jnp.float32), ctx)
    assert sorted(np.asarray(cache.pos)[0, 0][np.asarray(cache.pos)[0, 0] >= 0].tolist()) == list(range(6))


def test_protected_mask_covers_sinks_and_the_window_ending_at_the_query():
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, -1]])
    m = np.asarray(protected_mask(pos, jnp.asarray([6]), 2, 3))
    assert m.tolist() == [[True, True, False, False, True, True, True, False]]
