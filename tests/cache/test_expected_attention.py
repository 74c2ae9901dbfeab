"""Expected Attention against a NumPy implementation of the published formula, its RoPE average
against the model's own rotation, and the adakv(<scorer>) combinator's budgets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pikv_jax.api import PiKVModel
from pikv_jax.attention.rope import rope_inv_freq, rotate
from pikv_jax.cache.policies import AdaKV, ExpectedAttention, Knorm, SnapKV, make_policy
from pikv_jax.cache.policies.base import PrefillContext
from pikv_jax.cache.policies.expected_attention import averaged_rope
from pikv_jax.cache.pooled import PooledLayerCache
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method


def np_rope_matrix(p: int, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE at position p as a D x D matrix, written from its definition."""
    half = len(inv_freq)
    r = np.zeros((2 * half, 2 * half))
    for i, f in enumerate(inv_freq):
        c, s = np.cos(p * f), np.sin(p * f)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def np_expected_attention(q_raw, k, v, pos, lengths, inv_freq, *, n_sink, n_future, epsilon, use_cov=True,
                          use_vnorm=True):
    """f64[B, Hkv, S]: the method as published (Devoto et al., 2025) and as kvpress applies it (the
    softmax over the non-sink keys; sinks kept, +inf), one row and head at a time."""
    b, s, h, d = q_raw.shape
    hk = k.shape[2]
    g = h // hk
    out = np.full((b, hk, s), -np.inf)
    for r in range(b):
        real = pos[r] >= 0
        use = real & (pos[r] >= n_sink)
        if not use.any():
            use = real
        rbar = np.mean([np_rope_matrix(lengths[r] + t, inv_freq) for t in range(n_future)], axis=0)
        scored = real & (pos[r] >= n_sink)
        out[r, :, real & (pos[r] < n_sink)] = np.inf
        if not scored.any():
            continue
        for kh in range(hk):
            probs = []
            for qh in range(kh * g, (kh + 1) * g):
                qs = q_raw[r, use, qh].astype(np.float64)
                mu = qs.mean(0)
                cov = (qs - mu).T @ (qs - mu) / len(qs)
                mu, cov = rbar @ mu, rbar @ cov @ rbar.T
                keys = k[r, scored, kh].astype(np.float64)
                logit = keys @ mu / np.sqrt(d) + (np.einsum("sd,de,se->s", keys, cov, keys) / (2 * d) if use_cov else 0)
                e = np.exp(logit - logit.max())
                probs.append(e / e.sum())
            p = np.mean(probs, axis=0) + epsilon
            if use_vnorm:
                p = p * np.linalg.norm(v[r, scored, kh].astype(np.float64), axis=-1)
            out[r, kh, scored] = p
    return out


def _context(seed, b=2, s=24, h=6, hk=2, d=16, lengths=(24, 17)):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hk, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hk, d)).astype(np.float32)
    lengths = np.array(lengths, np.int32)
    pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1).astype(np.int32)
    inv_freq = np.asarray(rope_inv_freq(d, 10000.0, None))
    ctx = PrefillContext(q=jnp.asarray(q), k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                         lengths=jnp.asarray(lengths), key_mass=None, shared={}, q_raw=jnp.asarray(q),
                         inv_freq=jnp.asarray(inv_freq))
    return ctx, (q, k, v, pos, lengths, inv_freq)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_future=st.sampled_from([1, 7, 64]), epsilon=st.sampled_from([0.0, 1e-2]),
       n_sink=st.sampled_from([0, 4]), use_cov=st.booleans(), use_vnorm=st.booleans(),
       lengths=st.tuples(st.integers(1, 24), st.integers(1, 24)))
def test_scores_match_numpy_reference(seed, n_future, epsilon, n_sink, use_cov, use_vnorm, lengths):
    lengths = (24, lengths[1]) if max(lengths) < 24 else lengths  # the padded width is 24
    ctx, (q, k, v, pos, lens, inv_freq) = _context(seed, lengths=lengths)
    policy = ExpectedAttention(n_future_positions=n_future, epsilon=epsilon, n_sink=n_sink, use_covariance=use_cov,
                               use_vnorm=use_vnorm, budget_ratio=0.5)
    got = np.asarray(jax.jit(lambda: policy.prefill_scores(0, ctx))())
    want = np_expected_attention(q, k, v, pos, lens, inv_freq, n_sink=n_sink, n_future=n_future, epsilon=epsilon,
                                 use_cov=use_cov, use_vnorm=use_vnorm)
    assert np.array_equal(np.isinf(got), np.isinf(want)) and np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=2e-4, atol=1e-6)


def test_averaged_rope_of_one_position_is_the_models_rotation():
    d, inv_freq = 16, rope_inv_freq(16, 10000.0, None)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, d))
    starts = jnp.array([0, 5, 1000], jnp.int32)
    rot = averaged_rope(starts, 1, inv_freq)
    np.testing.assert_allclose(np.einsum("bde,be->bd", rot, x), rotate(x, starts, inv_freq), rtol=1e-5, atol=1e-5)
    # averaging over many positions damps the fast-rotating pairs and keeps the slow ones
    avg = np.asarray(averaged_rope(jnp.array([100], jnp.int32), 512, inv_freq))[0]
    assert abs(avg[0, 0]) < 0.05 and abs(avg[d // 2 - 1, d // 2 - 1]) > 0.9


def test_needs_queries_before_rope():
    ctx, _ = _context(0)
    bare = PrefillContext(q=ctx.q, k=ctx.k, v=ctx.v, pos=ctx.pos, lengths=ctx.lengths, key_mass=None, shared={})
    with pytest.raises(ValueError, match="needs the queries before RoPE"):
        ExpectedAttention(budget_ratio=0.5).prefill_scores(0, bare)


@pytest.mark.parametrize("kwargs, match", [({"n_future_positions": 0}, "n_future_positions must be"),
                                           ({"epsilon": -1.0}, "epsilon must be >= 0"),
                                           ({"num_query_heads": -2}, "num_query_heads must be")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpectedAttention(budget_ratio=0.5, **kwargs)


def test_decode_eviction_needs_the_query_heads():
    with pytest.raises(ValueError, match="needs num_query_heads, a multiple of the 2 KV heads"):
        ExpectedAttention(budget_tokens=8, decode_evict=True).init_layer_cache(0, 1, 2, 8, 16, jnp.float32)
    with pytest.raises(ValueError, match="cannot wrap expected_attention with decode_evict"):
        QuantizedPolicy(bits=4, inner=ExpectedAttention(budget_tokens=64, decode_evict=True, num_query_heads=6))


@pytest.mark.parametrize("step", [0, 5])
def test_decode_eviction_scores_match_numpy_reference(step):
    """With decode_evict the cache keeps the prompt's statistics; at decode every resident key is
    re-scored with the future window starting after the token being written (position q_pos + 1)."""
    ctx, (q, k, v, pos, lens, inv_freq) = _context(7)
    policy = ExpectedAttention(budget_tokens=64, decode_evict=True, num_query_heads=6, epsilon=1e-2)
    cache = policy.init_layer_cache(0, 2, 2, 24, 16, jnp.float32)
    cache = jax.jit(lambda c: policy.prefill(0, c, ctx))(cache)
    q_pos = jnp.asarray(lens + step - 1, jnp.int32)  # the token being written at this step
    got = np.asarray(jax.jit(lambda c: policy.eviction_scores(0, c, q_pos))(cache))
    want = np_expected_attention(q, k, v, pos, lens + step, inv_freq, n_sink=4, n_future=512, epsilon=1e-2)
    slot_pos = np.asarray(cache.pos)
    for b in range(2):
        for h in range(2):
            real = slot_pos[b, h] >= 0
            np.testing.assert_allclose(got[b, h][real], want[b, h][slot_pos[b, h][real]], rtol=2e-4, atol=1e-6)
            assert np.all(np.isinf(got[b, h][~real]))


# ------------------------------------------------------------------ adakv(<scorer>)


@pytest.mark.parametrize("scorer", [ExpectedAttention(), Knorm(), SnapKV(obs_window=4)], ids=lambda p: p.name)
def test_adakv_combinator_keeps_the_layer_budget(scorer):
    """adakv(x) keeps exactly Hkv x row budget prompt tokens per row, at least the safeguard share in
    every head, and ranks by x's scores (not SnapKV's)."""
    ctx, (_, _, _, pos, lens, _) = _context(3, s=40, lengths=(40, 29))
    policy = AdaKV(scorer=scorer, budget_ratio=0.5, n_sink=2, obs_window=4, safe_fraction=0.2)
    assert policy.label == f"adakv({scorer.name})"
    cache = policy.init_layer_cache(0, 2, 2, policy.capacity_for(0, 40, 0), 16, jnp.float32)
    out: PooledLayerCache = jax.jit(lambda c: policy.prefill(0, c, ctx))(cache)
    head = np.asarray(out.head)
    slot_pos = np.asarray(out.pos)
    scores = np.asarray(scorer.prefill_scores(0, ctx))
    for r, n in enumerate(lens):
        row_budget = int(np.ceil(0.5 * n))
        kept = slot_pos[r] >= 0
        assert kept.sum() == 2 * row_budget
        m = row_budget - (2 + 4)  # selectable per head: budget minus sinks and window
        for h in range(2):
            mine = slot_pos[r][kept & (head[r] == h)]
            assert len(set(mine.tolist())) == len(mine)
            assert {0, 1} | set(range(n - 4, n)) <= set(mine.tolist())
            assert len(mine) - 6 >= int(np.floor(0.2 * m + 1e-4))
        chosen = {(int(h), int(p)) for h, p in zip(head[r][kept], slot_pos[r][kept])}
        assert chosen == np_adakv_selection(scores[r], n, row_budget, n_sink=2, window=4, safe_fraction=0.2)


def np_adakv_selection(scores, n, row_budget, *, n_sink, window, safe_fraction):
    """AdaKV's selection written directly: protected tokens, each head's own top floor(alpha m),
    then one top-k over all heads' remaining candidates (ties: lower head, then lower position)."""
    hk = scores.shape[0]
    prot = set(range(n_sink)) | set(range(n - window, n))
    m = row_budget - len(prot)
    n_safe = int(np.floor(safe_fraction * m + 1e-4))
    keep = {(h, p) for h in range(hk) for p in prot}
    rest = []
    for h in range(hk):
        cand = sorted((p for p in range(n) if p not in prot), key=lambda p: (-scores[h, p], p))
        keep |= {(h, p) for p in cand[:n_safe]}
        rest += [(h, p) for p in cand[n_safe:]]
    rest.sort(key=lambda hp: (-scores[hp], hp[0] * 10**6 + hp[1]))
    return keep | set(rest[: hk * (m - n_safe)])


def test_adakv_spec_and_bad_scorer():
    m = parse_method("adakv(expected_attention,safe_fraction=0.3)@0.25", num_layers=2)
    assert m.label == "adakv(expected_attention,safe_fraction=0.3)@0.25"
    assert isinstance(m.policy.scorer, ExpectedAttention) and m.policy.safe_fraction == 0.3
    assert make_policy("adakv", scorer="knorm", budget_ratio=0.5).label == "adakv(knorm)"
    with pytest.raises(ValueError, match="does not score prompt tokens"):
        make_policy("adakv", scorer="full", budget_ratio=0.5)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        parse_method("adakv(nope)@0.25")


def test_generate_binds_the_query_heads_and_holds_the_budget():
    """PiKVModel fills num_query_heads; under decode-time eviction every layer and head holds exactly
    the budget once the cache is full."""
    model = PiKVModel.from_config(tiny_config(num_hidden_layers=2))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 90, n).tolist() for n in (30, 18)]
    out = model.generate(prompts, 12, policy=ExpectedAttention(budget_tokens=16, decode_evict=True), stop_ids=())
    assert [len(t) for t in out.token_ids] == [12, 12]
    assert out.stats["kept_tokens"] == 2 * 16
