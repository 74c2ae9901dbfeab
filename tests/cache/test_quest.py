"""Quest: the page bound is an upper bound (property-tested), selected pages equal a numpy top-k,
attention over the selected pages equals numpy, bounds stay exact through prefill / writes /
Composite, capacities are page multiples, and a budget covering the cache equals the full cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import model_trace, tiny_pikv

from pikv_jax.cache.policies import Composite, Quest, SnapKV, make_policy
from pikv_jax.cache.policies.quest import page_bounds
from pikv_jax.cache.state import init_layer_cache
from pikv_jax.kernels.quest import page_upper_bound

bounds_fn = jax.jit(page_bounds, static_argnums=2)
upper_fn = jax.jit(page_upper_bound)


# ----------------------------------------------------------------------------- the page bound


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]), fill=st.floats(0.05, 1.0))
def test_page_bound_is_an_upper_bound(seed, scale, fill):
    """For random keys (some slots empty) and queries, U(page) >= q . k for every resident key of the
    page, for every query head and for the group max; U equals sum_c max(q_c min_c, q_c max_c)."""
    rng = np.random.default_rng(seed)
    b, hk, g, c, d, ps = 1, 2, 3, 16, 8, 4
    k = (rng.normal(size=(b, hk, c, d)) * scale).astype(np.float32)
    q = (rng.normal(size=(b, hk, g, d)) * rng.choice([1e-2, 1.0, 10.0])).astype(np.float32)
    pos = np.where(rng.random((b, hk, c)) < fill, np.arange(c), -1).astype(np.int32)
    pmin, pmax = (np.asarray(x) for x in bounds_fn(jnp.asarray(k), jnp.asarray(pos), ps))
    nonempty = (pos.reshape(b, hk, c // ps, ps) >= 0).any(-1)
    u = np.asarray(upper_fn(jnp.asarray(q), jnp.asarray(pmin), jnp.asarray(pmax), jnp.asarray(nonempty)))
    for h in range(hk):
        for p in range(c // ps):
            slots = [s for s in range(p * ps, (p + 1) * ps) if pos[0, h, s] >= 0]
            if not slots:
                assert np.all(u[0, h, :, p] == -np.inf) and np.all(pmin[0, h, p] == np.inf)
                continue
            keys = k[0, h, slots].astype(np.float64)
            np.testing.assert_array_equal(pmin[0, h, p], keys.min(0).astype(np.float32))
            np.testing.assert_array_equal(pmax[0, h, p], keys.max(0).astype(np.float32))
            qq = q[0, h].astype(np.float64)
            dots = qq @ keys.T  # [G, n]
            want = np.maximum(qq * keys.min(0), qq * keys.max(0)).sum(-1)
            tol = 1e-5 * (np.abs(qq) @ np.abs(keys).max(0) + 1e-30)
            np.testing.assert_allclose(u[0, h, :, p], want, rtol=0, atol=tol.max())
            assert np.all(u[0, h, :, p][:, None] >= dots - tol[:, None]), "bound below a key's score"
            assert u[0, h, :, p].max() >= dots.max() - tol.max()  # the group max bounds every head


# ----------------------------------------------------------------------------- selection and attention


def _cache(rng, b=2, hk=2, c=32, d=8, lengths=(29, 11)):
    """A uniform cache in chronological slot order (as Quest keeps it), ragged rows."""
    k = rng.normal(size=(b, hk, c, d)).astype(np.float32)
    v = rng.normal(size=(b, hk, c, d)).astype(np.float32)
    pos = np.where(np.arange(c)[None, None] < np.asarray(lengths)[:, None, None], np.arange(c), -1)
    pos = np.broadcast_to(pos, (b, hk, c)).astype(np.int32)
    return k, v, pos


def _quest_cache(policy, k, v, pos):
    b, hk, c, d = k.shape
    cache = policy.init_layer_cache(5, b, hk, c, d, jnp.float32)
    pmin, pmax = page_bounds(jnp.asarray(k), jnp.asarray(pos), policy.page_size)
    return cache.replace(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                         extra=dict(cache.extra, page_min=pmin, page_max=pmax))


def numpy_selection(q, k, pos, q_pos, ps, n_sel, reduce=np.max):
    """Per (row, KV head): the set of selected pages and whether each is a real (non-empty) page."""
    b, h, d = q.shape
    hk, c = k.shape[1], k.shape[2]
    g = h // hk
    out = {}
    for bi in range(b):
        for hi in range(hk):
            scores = []
            for p in range(c // ps):
                slots = [s for s in range(p * ps, (p + 1) * ps) if pos[bi, hi, s] >= 0]
                if not slots:
                    scores.append(-np.inf)
                    continue
                lo, hi_ = k[bi, hi, slots].min(0), k[bi, hi, slots].max(0)
                u = [np.maximum(q[bi, hi * g + j] * lo, q[bi, hi * g + j] * hi_).sum() for j in range(g)]
                scores.append(reduce(u))
            newest = int(np.nonzero(pos[bi, hi] == q_pos[bi])[0][0]) // ps
            scores[newest] = np.inf
            order = sorted(range(len(scores)), key=lambda p: -scores[p])[:n_sel]
            out[bi, hi] = {p for p in order if scores[p] > -np.inf}
    return out


@pytest.mark.parametrize("token_budget, page_reduce", [(12, "max"), (20, "max"), (8, "mean"), (40, "sum")])
def test_selected_pages_equal_numpy_topk(token_budget, page_reduce):
    rng = np.random.default_rng(token_budget)
    policy = Quest(page_size=4, token_budget=token_budget, dense_layers=0, page_reduce=page_reduce)
    k, v, pos = _cache(rng)
    q = rng.normal(size=(2, 4, 8)).astype(np.float32)
    q_pos = np.array([28, 10], np.int32)
    cache = _quest_cache(policy, k, v, pos)
    pages, ok = jax.jit(policy.select_pages)(cache, jnp.asarray(q), jnp.asarray(q_pos))
    n_sel = max(3, token_budget // 4)
    assert pages.shape == (2, 2, min(n_sel, 8))
    want = numpy_selection(q, k, pos, q_pos, 4, n_sel, dict(max=np.max, mean=np.mean, sum=np.sum)[page_reduce])
    for (bi, hi), sel in want.items():
        got = {int(p) for p, o in zip(pages[bi, hi], ok[bi, hi]) if o}
        assert got == sel, f"row {bi} head {hi}"
        assert (q_pos[bi] // 4) in got  # the newest token's page
        assert all(pos[bi, hi, p * 4: p * 4 + 4].max() >= 0 for p in got)  # never an empty page


def test_attention_over_selected_pages_equals_numpy():
    rng = np.random.default_rng(0)
    policy = Quest(page_size=4, token_budget=12, dense_layers=0)  # 3 of 8 pages
    k, v, pos = _cache(rng)
    q = rng.normal(size=(2, 4, 8)).astype(np.float32)
    q_pos = np.array([28, 10], np.int32)
    cache = _quest_cache(policy, k, v, pos)
    out, mass = jax.jit(functools.partial(policy.attend, 5))(cache, jnp.asarray(q), jnp.asarray(q_pos))
    sel = numpy_selection(q, k, pos, q_pos, 4, 3)
    for bi in range(2):
        for hi in range(2):
            slots = [s for p in sorted(sel[bi, hi]) for s in range(p * 4, p * 4 + 4) if pos[bi, hi, s] >= 0]
            probs = []
            for j in range(2):
                logits = k[bi, hi, slots] @ q[bi, hi * 2 + j] / np.sqrt(8)
                pr = np.exp(logits - logits.max())
                pr /= pr.sum()
                probs.append(pr)
                np.testing.assert_allclose(out[bi, hi * 2 + j], pr @ v[bi, hi, slots], rtol=1e-5, atol=1e-6)
            want = np.zeros(32)
            want[slots] = np.mean(probs, axis=0)  # group mean, scattered back to slot shape
            np.testing.assert_allclose(mass[bi, hi], want, rtol=1e-5, atol=1e-7)


def test_capacity_is_a_page_multiple_and_indivisible_caches_raise():
    policy = Quest(page_size=16, token_budget=64, dense_layers=1)
    assert policy.capacity_for(1, 64, 5) == 80 and policy.capacity_for(0, 64, 16) == 80
    assert policy.init_layer_cache(1, 1, 2, 70, 8, jnp.float32).capacity == 80
    assert policy.init_layer_cache(0, 1, 2, 70, 8, jnp.float32).extra == {}  # dense layer: no page state
    bad = init_layer_cache(1, 2, 70, 8, jnp.float32)
    bad = bad.replace(extra=policy.init_layer_cache(1, 1, 2, 80, 8, jnp.float32).extra)
    q = jnp.zeros((1, 4, 8))
    for call in (lambda: policy.attend(1, bad, q, jnp.asarray([3])),
                 lambda: policy.decode_slot(1, bad, jnp.asarray([3]))):
        with pytest.raises(ValueError, match="page_size=16 does not divide the cache capacity 70"):
            call()


def test_arguments_are_validated():
    for kw, word in ((dict(page_size=0), "page_size"), (dict(token_budget=0), "token_budget"),
                     (dict(dense_layers=-1), "dense_layers"), (dict(page_reduce="min"), "page_reduce"),
                     (dict(budget_ratio=0.5), "token_budget"), (dict(decode_evict=True), "decode_evict")):
        with pytest.raises(ValueError, match=word):
            Quest(**kw)
    p = make_policy("quest", token_budget=256)
    assert (p.page_size, p.dense_layers, p.page_reduce) == (16, 2, "max") and p.num_pages_selected(1024) == 16
    assert p.num_pages_selected(32) == 2 and Quest(token_budget=8).num_pages_selected(1024) == 3


# ----------------------------------------------------------------------------- tiny model


def tiny():
    return tiny_pikv(5)


def trace(policy, tokens, lengths, dec):
    return model_trace(policy, tokens, lengths, dec, seed=5)


def _check_bounds(layer, ps):
    pmin, pmax = page_bounds(jnp.asarray(layer.k), jnp.asarray(layer.pos), ps)
    np.testing.assert_array_equal(layer.extra["page_min"], pmin)
    np.testing.assert_array_equal(layer.extra["page_max"], pmax)
    assert layer.extra["pages_synced"].all()


@pytest.mark.parametrize("composite", [False, True])
def test_bounds_exact_through_prefill_and_decode(composite):
    """Page bounds equal a from-scratch computation after prefill and after decode steps (ragged rows,
    pages filling up across steps); under Composite (SnapKV selects the prompt) the first decode
    step rebuilds them. Nothing is evicted; the sparse layer sees only a few pages."""
    rng = np.random.default_rng(1)
    b, s, n = 2, 21, 7
    tokens = rng.integers(3, 97, (b, s)).astype(np.int32)
    lengths = np.array([21, 9], np.int32)
    dec = rng.integers(3, 97, (b, n)).astype(np.int32)
    quest = Quest(page_size=4, token_budget=8, dense_layers=1)
    policy = Composite(prefill_policy=SnapKV(budget_tokens=12, obs_window=4, n_sink=2), decode_policy=quest) \
        if composite else quest
    _, logits, wrote, pre, final = trace(policy, tokens, lengths, dec)
    assert wrote.all() and np.all(np.isfinite(logits))
    dense, sparse = final.layers
    assert dense.extra == {} and sparse.capacity % 4 == 0
    if not composite:
        _check_bounds(pre.layers[1], 4)
    else:
        assert not pre.layers[1].extra["pages_synced"].any()
    _check_bounds(sparse, 4)
    kept = np.minimum(lengths, 12) if composite else lengths
    np.testing.assert_array_equal(sparse.resident_per_head(), np.repeat((kept + n)[:, None], 2, 1))


def test_whole_budget_reproduces_full_cache_and_small_budget_runs():
    _, m = tiny()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 97, n).tolist() for n in (30, 17)]
    conts = [rng.integers(3, 97, 6).tolist() for _ in prompts]
    policy = Quest(token_budget=80, dense_layers=1)  # 5 pages of 16 = the whole 80-slot cache, page path taken
    full, quest = m.generate(prompts, 6, stop_ids=()), m.generate(prompts, 6, policy=policy, stop_ids=())
    assert quest.token_ids == full.token_ids
    lp_full, _ = m.teacher_forced(prompts, conts, full_logprobs=True)
    lp_quest, _ = m.teacher_forced(prompts, conts, policy=policy, full_logprobs=True)
    np.testing.assert_allclose(lp_quest, lp_full, rtol=1e-5, atol=1e-5)
    # a real budget (3 pages of 4 of up to 20), through generate; memory = full cache + page bounds
    small = make_policy("quest", page_size=4, token_budget=8, dense_layers=1)
    out = m.generate(prompts, 6, policy=small, stop_ids=())
    assert [len(t) for t in out.token_ids] == [6, 6]
    cfg, _ = tiny()
    hk, d, layers, b = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_hidden_layers, 2
    slot = 2 * d * 4 + 2 * 4  # k, v, pos, score
    assert full.stats["cache_bytes"] == layers * b * hk * 70 * slot + b * 4  # 64 + 6 slots, plus lengths
    bounds = 2 * b * hk * (72 // 4) * d * 4 + b  # page min + max of the one sparse layer, synced flags
    assert out.stats["cache_bytes"] == layers * b * hk * 72 * slot + b * 4 + bounds  # 70 rounded up to 72
