"""Token-selecting compressors against numpy on small exact cases: FastV's kept set at layer K and the
capacities above it, ChunkKV's whole chunks on ragged rows, the pyramid's per-layer budgets.

Prefill selections run eagerly on contexts built from the model's own captured q/k/v (no compile);
one generation trace shows FastV's smaller caches in use."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from compress_helpers import prefill_contexts, prefill_eager, random_prompts, run_trace, tiny_model

from pikv_jax.cache.policies import H2O, CachePolicy, SnapKV
from pikv_jax.cache.state import init_layer_cache
from pikv_jax.compress.chunkkv import ChunkKVCompressor, ChunkKVPolicy, chunk_keep_mask
from pikv_jax.compress.fastv import FastVCompressor, FastVPolicy
from pikv_jax.compress.pyramid import PyramidCompressor, PyramidPolicy
from pikv_jax.compress.selection import proxy_importance
from pikv_jax.runtime.capture import capture_qkv

LENGTHS, STEPS = (30, 45), 40


@functools.lru_cache(maxsize=None)
def captured():
    model = tiny_model()
    prompts = random_prompts(LENGTHS, seed=11)
    return model, prompts, capture_qkv(model, prompts)


def contexts():
    """One PrefillContext per layer (sharing one `shared` dict, as in forward.prefill)."""
    model, prompts, _ = captured()
    return prefill_contexts(model, prompts)


def prefill_all(policy):
    """Eager prefill of every layer -> list of LayerCache."""
    return prefill_eager(policy, contexts())


def resident(cache, b, h):
    pos = np.asarray(cache.pos)[b, h]
    return set(pos[pos >= 0].tolist())


def protected_set(n, n_sink, window):
    return {p for p in range(n) if p < n_sink or p > n - 1 - window}


def top_with_protection(scores, n, keep, prot):
    """numpy: protected tokens plus the best-scored others (ties: earlier), `keep` in total."""
    order = sorted((p for p in range(n) if p not in prot), key=lambda p: (-scores[p], p))
    return prot | set(order[: keep - len(prot)])


# ---------------------------------------------------------------------------------------------- FastV


def test_fastv_keeps_the_last_tokens_favourites_above_layer_k():
    model, _, layers = captured()
    policy = FastVPolicy(layer=0, drop_ratio=0.5, n_sink=2, window=3)
    caches = prefill_all(policy)
    x = layers[0]
    d = x.q.shape[-1]
    g = x.q.shape[2] // x.k.shape[1]
    for b, n in enumerate(LENGTHS):
        q = x.q[b, n - 1]  # [H, D]: the row's last prompt token
        logits = np.stack([x.k[b, h // g, :n] @ q[h] for h in range(q.shape[0])]) / np.sqrt(d)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        score = (probs / probs.sum(-1, keepdims=True)).mean(0)  # mean over all query heads
        keep = n - math.floor(0.5 * n)
        want = top_with_protection(score, n, keep, protected_set(n, 2, 3))
        for h in range(2):
            assert resident(caches[0], b, h) == set(range(n))  # layers <= K keep everything
            assert resident(caches[1], b, h) == want
    assert policy.layer_budget(0, 48) == 48 and policy.layer_budget(1, 48) == 24
    np.testing.assert_array_equal(policy.row_budget(1, jnp.asarray(LENGTHS), 48), [15, 23])
    assert [policy.capacity_for(l, 48, 10) for l in (0, 1)] == [58, 34]


def test_fastv_with_an_inner_budget_and_in_generation():
    policy = FastVPolicy(inner=H2O(budget_ratio=0.25), layer=0, drop_ratio=0.5, n_sink=2, window=3)
    assert policy.layer_budget(0, 48) == 12 and policy.layer_budget(1, 48) == 12  # min(fastv, inner budget)
    assert policy.capacity_for(1, 48, 10) == 12  # H2O evicts while decoding
    assert policy.label == "h2o+fastv:0:0.5"

    model, prompts, _ = captured()
    fed = np.random.default_rng(2).integers(3, 97, (2, STEPS))
    full = run_trace(model, CachePolicy(), prompts, fed)
    out = run_trace(model, FastVCompressor(layer=0, drop_ratio=0.5, n_sink=2, window=3).as_policy(), prompts, fed)
    caps = [layer.capacity for layer in out["cache"].layers]
    assert caps == [45 + STEPS, 23 + STEPS]  # real, smaller cache above K
    np.testing.assert_array_equal(out["prefill_logits"], full["prefill_logits"])  # the prompt's attention is exact
    assert out["cache"].layers[1].nbytes() < out["cache"].layers[0].nbytes()
    res = np.asarray(out["cache"].layers[1].resident_per_head())
    np.testing.assert_array_equal(res, np.array([[15 + STEPS] * 2, [23 + STEPS] * 2]))


def test_fastv_standalone():
    k = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 20, 8)), jnp.float32)
    imp = jnp.asarray(np.random.default_rng(1).random((1, 20)), jnp.float32)
    c = FastVCompressor(drop_ratio=0.5, n_sink=1, window=2)
    out = c(k, k, importance=imp)
    want = top_with_protection(np.asarray(imp[0]), 20, 10, protected_set(20, 1, 2))
    assert set(np.asarray(out.pos[0, 0]).tolist()) == want and out.k.shape == (1, 2, 10, 8)
    rk, _ = out.decompress()
    dropped = sorted(set(range(20)) - want)
    assert float(jnp.abs(rk[0, :, dropped]).max()) == 0.0
    s = c.get_compression_stats()
    assert s["stored_bytes"] == out.nbytes() and s["method_usage"] == {"fastv": 1}


def test_queries_are_a_call_argument_not_compressor_state():
    """`queries=` goes through the call to `compress` (nothing is kept on the compressor): FastV with
    the last query and ChunkKV with the last w queries keep what the importance those queries give
    would keep, and a later call without queries is back to the key proxy."""
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.normal(size=(2, 2, 40, 8)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(2, 4, 6, 8)), jnp.float32)  # [B, H, w, D]
    for c, queries, window in ((FastVCompressor(drop_ratio=0.5, n_sink=2, window=3), q[:, :, -1], 1),
                               (ChunkKVCompressor(5, 0.4, obs_window=6, n_sink=2), q, 6)):
        state = dict(vars(c))
        with_q = c(k, k, queries=queries)
        want = c(k, k, proxy_importance(k, queries, window))
        np.testing.assert_array_equal(with_q.pos, want.pos)
        np.testing.assert_array_equal(c.compress(k, k, queries=queries).pos, want.pos)
        assert vars(c).keys() == state.keys()
        np.testing.assert_array_equal(c(k, k).pos, c(k, k, proxy_importance(k, None, window)).pos)
        assert c.get_compression_stats()["calls"] == 4


def test_fastv_errors():
    with pytest.raises(ValueError, match=r"drop_ratio must be in \[0, 1\)"):
        FastVCompressor(drop_ratio=1.0)
    with pytest.raises(ValueError, match="layer K must be an integer >= 0"):
        FastVCompressor(layer=-1)
    policy = FastVPolicy(layer=5)
    ctx = contexts()[1]
    cache = init_layer_cache(2, 2, policy.layer_budget(6, ctx.prompt_len), 16, jnp.float32)
    with pytest.raises(ValueError, match="needs the ranking of layer 5"):
        policy.prefill(6, cache, ctx)


# ---------------------------------------------------------------------------------------------- ChunkKV


def np_chunk_keep(scores, valid, protect, budget, cs):
    """numpy reference of one (row, head): whole chunks by score while they fit."""
    s = len(scores)
    chunks = [range(c, min(c + cs, s)) for c in range(0, s, cs)]
    cost = [sum(valid[i] and not protect[i] for i in ch) for ch in chunks]
    score = [sum(scores[i] for i in ch if valid[i]) for ch in chunks]
    remaining = budget - sum(valid[i] and protect[i] for i in range(s))
    keep = {i for i in range(s) if valid[i] and protect[i]}
    for c in sorted((c for c in range(len(chunks)) if cost[c] > 0), key=lambda c: (-score[c], c)):
        if cost[c] > remaining:
            break
        remaining -= cost[c]
        keep |= {i for i in chunks[c] if valid[i]}
    return keep


def test_chunk_mask_small_exact_case():
    scores = np.array([1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 9], np.float32)  # chunks of 4: [4, 0, 8, 9]
    valid = np.ones(13, bool)
    protect = np.zeros(13, bool)
    run = lambda budget: set(np.nonzero(np.asarray(chunk_keep_mask(
        jnp.asarray(scores)[None, None], jnp.asarray(valid)[None, None], jnp.asarray(protect)[None, None],
        jnp.array([budget]), 4))[0, 0])[0].tolist())
    assert run(1) == {12}  # the 1-token last chunk has the best score
    assert run(5) == {12, 8, 9, 10, 11}
    assert run(8) == {12, 8, 9, 10, 11}  # chunk 0 does not fit whole: stop
    assert run(9) == {12, 8, 9, 10, 11, 0, 1, 2, 3}


@pytest.mark.parametrize("seed", range(4))
def test_chunk_mask_matches_numpy_on_ragged_rows(seed):
    rng = np.random.default_rng(seed)
    b, h, s, cs = 3, 2, 37, 5
    scores = rng.random((b, h, s)).astype(np.float32)
    lengths = np.array([37, 23, 9])
    valid = np.broadcast_to(np.arange(s)[None, None] < lengths[:, None, None], (b, h, s))
    protect = valid & ((np.arange(s) < 2) | (np.arange(s) > lengths[:, None, None] - 4))
    budget = np.array([20, 12, 9])
    got = np.asarray(chunk_keep_mask(jnp.asarray(scores), jnp.asarray(valid), jnp.asarray(protect),
                                     jnp.asarray(budget), cs))
    for i in range(b):
        for j in range(h):
            want = np_chunk_keep(scores[i, j], valid[i, j], protect[i, j], budget[i], cs)
            assert set(np.nonzero(got[i, j])[0].tolist()) == want
            assert got[i, j].sum() <= budget[i]


def _window_scores(x, b, n, w):
    """numpy SnapKV-style scores of row b: mean attention of its last w queries, GQA groups averaged."""
    d = x.q.shape[-1]
    g = x.q.shape[2] // x.k.shape[1]
    out = np.zeros((x.k.shape[1], x.k.shape[2]))
    for p in range(n - w, n):
        for hq in range(x.q.shape[2]):
            logits = x.k[b, hq // g, : p + 1] @ x.q[b, p, hq] / np.sqrt(d)
            e = np.exp(logits - logits.max())
            out[hq // g, : p + 1] += e / e.sum() / g / w
    return out


def test_chunkkv_policy_keeps_whole_chunks_of_ragged_rows():
    _, _, layers = captured()
    cs, w = 5, 4
    policy = ChunkKVPolicy(budget_ratio=0.5, chunk_size=cs, obs_window=w, n_sink=2)
    caches = prefill_all(policy)
    for l, x in enumerate(layers):
        for b, n in enumerate(LENGTHS):
            scores = _window_scores(x, b, n, w).sum(0)  # one selection for the layer's heads
            valid = np.arange(x.k.shape[2]) < n
            prot = np.array([p < 2 or n - w <= p < n for p in range(x.k.shape[2])])
            want = np_chunk_keep(scores, valid, prot, math.ceil(0.5 * n), cs)
            for h in range(2):
                got = resident(caches[l], b, h)
                assert got == want and max(got) < n and len(got) <= math.ceil(0.5 * n)
                # every chunk is all-in or all-out (protected tokens aside)
                for c in range(0, n, cs):
                    free = [p for p in range(c, min(c + cs, n)) if not prot[p]]
                    assert all(p in got for p in free) or not any(p in got for p in free)


def test_chunkkv_compressor_budget_and_standalone():
    c = ChunkKVCompressor(chunk_size=4, obs_window=2, n_sink=1)
    assert c.as_policy(H2O(budget_ratio=0.25)).budget_ratio == 0.25  # the inner policy's budget
    assert c.as_policy().budget_ratio == 0.5
    assert ChunkKVCompressor(compression_ratio=0.3).as_policy(H2O(budget_ratio=0.25)).budget_ratio == 0.3
    k = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 22, 8)), jnp.float32)
    imp = np.random.default_rng(4).random((2, 22)).astype(np.float32)
    out = c(k, k, importance=jnp.asarray(imp))
    for b in range(2):
        prot = np.array([p < 1 or p >= 20 for p in range(22)])
        want = np_chunk_keep(imp[b] * 2, np.ones(22, bool), prot, 11, 4)  # heads summed: 2 x the row's scores
        assert set(np.asarray(out.pos[b, 0])[np.asarray(out.pos[b, 0]) >= 0].tolist()) == want
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        ChunkKVCompressor(chunk_size=0)
    with pytest.raises(ValueError, match="needs a budget"):
        ChunkKVPolicy(chunk_size=4)


# ---------------------------------------------------------------------------------------------- pyramid


def test_pyramid_level_budgets():
    c = PyramidCompressor(576, compression_ratio=0.5, num_levels=3, decay_factor=0.8, num_layers=7)
    assert c.layer_ratios() == pytest.approx((0.5, 0.5, 0.5, 0.4, 0.4, 0.32, 0.32))
    c = PyramidCompressor(compression_ratio=0.1, num_levels=4, decay_factor=0.5, min_ratio=0.05, num_layers=4)
    assert c.layer_ratios() == pytest.approx((0.1, 0.05, 0.05, 0.05))
    with pytest.raises(ValueError, match="needs num_layers"):
        PyramidCompressor().as_policy()
    with pytest.raises(ValueError, match=r"decay_factor must be in \(0, 1\]"):
        PyramidCompressor(decay_factor=0.0)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \(0, 1\]"):
        PyramidCompressor(compression_ratio=1.5)
    with pytest.raises(ValueError, match="num_levels must be an integer >= 1"):
        PyramidCompressor(num_levels=0)


def test_pyramid_policy_budgets_and_selection():
    c = PyramidCompressor(compression_ratio=0.6, num_levels=2, decay_factor=0.5, num_layers=2, obs_window=4, n_sink=2)
    policy = c.as_policy()
    assert isinstance(policy, PyramidPolicy) and policy.ratios == pytest.approx((0.6, 0.3))
    assert [policy.layer_budget(l, 48) for l in (0, 1)] == [29, 15]
    assert [policy.capacity_for(l, 48, 10) for l in (0, 1)] == [39, 25]
    rows = [np.asarray(policy.row_budget(l, jnp.asarray(LENGTHS), 48)).tolist() for l in (0, 1)]
    assert rows == [[18, 27], [9, 14]]
    caches = prefill_all(policy)
    for l, ratio in enumerate((0.6, 0.3)):
        snap = SnapKV(budget_ratio=ratio, obs_window=4, n_sink=2)  # same scores and budgets, one layer
        ctx = contexts()[l]
        ref = snap.prefill(l, init_layer_cache(2, 2, snap.layer_budget(l, 48), 16, jnp.float32), ctx)
        for b in range(2):
            for h in range(2):
                assert resident(caches[l], b, h) == resident(ref, b, h)
                assert len(resident(caches[l], b, h)) == rows[l][b]


def test_pyramid_standalone_uses_the_layer_level():
    k = jnp.asarray(np.random.default_rng(5).normal(size=(1, 2, 100, 8)), jnp.float32)
    c = PyramidCompressor(compression_ratio=0.5, num_levels=3, decay_factor=0.8, obs_window=8, n_sink=2)
    assert c(k, k).k.shape[2] == 50
    assert c(k, k, layer=2).k.shape[2] == 32
    assert c.get_compression_stats()["calls"] == 2
