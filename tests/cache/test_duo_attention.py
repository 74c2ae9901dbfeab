"""DuoAttention: head-pattern calibration (statistic against numpy, a planted long-range head ranked
first, binarisation, the JSON file), the pooled cache with static per-head ranges (invariants,
memory), and equivalence with the full cache when nothing has to be dropped."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from policy_helpers import model_trace, tiny_pikv

from pikv_jax.cache.policies import CachePolicy, DuoAttention, make_policy
from pikv_jax.cache.pooled import PooledLayerCache
from pikv_jax.calibrate import duo as dc

share_fn = jax.jit(dc.long_range_share, static_argnames=("n_sink", "window", "sliding_window", "block_q"))


# ----------------------------------------------------------------------------- calibration


def numpy_share(q, k, pos, n_sink, window):
    """Plain-numpy long-range share: (sum over counted queries of the group-mean share [B, Hkv], count [B])."""
    b_n, t, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    sums, counts = np.zeros((b_n, hk)), np.zeros(b_n)
    for b in range(b_n):
        for i in range(t):
            p = pos[b, i]
            if p < n_sink + window:
                continue
            counts[b] += 1
            keys = [j for j in range(t) if 0 <= pos[b, j] <= p]
            for j in range(h):
                logits = np.array([q[b, i, j] @ k[b, kk, j // g] for kk in keys]) / np.sqrt(d)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                far = sum(pr for kk, pr in zip(keys, probs) if n_sink <= pos[b, kk] <= p - window)
                sums[b, j // g] += far / g
    return sums, counts


def test_long_range_share_matches_numpy():
    rng = np.random.default_rng(0)
    b, t, h, hk, d = 2, 21, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, hk, d)).astype(np.float32)
    lengths = np.array([21, 14])
    pos = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1).astype(np.int32)
    sums, counts = share_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos), jnp.asarray(pos), n_sink=2,
                            window=5, block_q=8)  # 21 queries in blocks of 8: padding exercised
    want_sums, want_counts = numpy_share(q, k, pos, 2, 5)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, want_counts)


def test_calibration_ranks_planted_long_range_head_first():
    """Four KV heads with hand-made attention: a sink head (everything on position 0), a local head
    (each query on itself), a uniform head, and a planted retrieval head (everything on position 5,
    far outside the window). The planted head must rank first, the sink and local heads last."""
    rng = np.random.default_rng(1)
    t, d, n_sink, window = 64, 64, 2, 8
    big = 40.0
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    r = rng.normal(size=(t, d))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    q = np.zeros((1, t, 4, d), np.float32)
    k = np.zeros((1, t, 4, d), np.float32)
    q[0, :, 0], k[0, 0, 0] = u * big, u * big             # sink head
    q[0, :, 1], k[0, :, 1] = r * big, r * big             # local head: q_i . k_i dominates
    k[0, :, 2] = rng.normal(size=(t, d)) * 0.01           # uniform head (q = 0)
    q[0, :, 3], k[0, 5, 3] = u * big, u * big             # planted long-range head
    pos = np.arange(t, dtype=np.int32)[None]
    sums, counts = share_fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos), jnp.asarray(pos), n_sink=n_sink,
                            window=window)
    share = np.asarray(sums)[0] / np.asarray(counts)[0]
    assert np.argsort(-share)[0] == 3 and share[3] > 0.9
    assert share[0] < 0.01 and share[1] < 0.05 and 0.3 < share[2] < share[3]
    pattern = dc.binarize(share[None], retrieval_fraction=0.25)
    assert pattern == ((False, False, False, True),)


def test_binarize_by_fraction_and_threshold():
    scores = [[0.1, 0.9, 0.4], [0.5, 0.3, 0.5]]
    assert dc.binarize(scores, retrieval_fraction=0.5) == ((False, True, False), (True, False, True))  # tie: earlier
    assert dc.binarize(scores, retrieval_fraction=0.0) == ((False,) * 3,) * 2
    assert dc.binarize(scores, retrieval_fraction=1.0) == ((True,) * 3,) * 2
    assert dc.binarize(scores, threshold=0.4) == ((False, True, True), (True, False, True))
    with pytest.raises(ValueError, match="exactly one"):
        dc.binarize(scores, retrieval_fraction=0.5, threshold=0.4)
    with pytest.raises(ValueError, match="retrieval_fraction"):
        dc.binarize(scores, retrieval_fraction=1.5)


def test_pattern_file_roundtrip_and_validation(tmp_path):
    hp = dc.HeadPattern(retrieval=((True, False), (False, True)), n_sink=4, window=16,
                        scores=((0.8, 0.1), (0.2, 0.7)), retrieval_fraction=0.5, metadata=dict(model="tiny"))
    path = tmp_path / "duo.json"
    dc.save_pattern(path, hp)
    data = json.loads(path.read_text())
    assert data["format"] == "pikv-duo-pattern" and data["version"] == 1
    assert data["retrieval_heads"] == [[True, False], [False, True]]
    assert (data["num_layers"], data["num_kv_heads"], data["n_sink"], data["window"]) == (2, 2, 4, 16)
    assert set(data) == {"format", "version", "method", "num_layers", "num_kv_heads", "retrieval_heads", "scores",
                         "n_sink", "window", "retrieval_fraction", "threshold", "metadata"}
    assert dc.load_pattern(path) == hp
    policy = DuoAttention.from_pattern_file(path)
    assert policy.pattern == hp.retrieval and (policy.n_sink, policy.window) == (4, 16)
    assert DuoAttention.from_pattern_file(path, window=8).window == 8
    bad = dict(data, retrieval_heads=[[True, False], [True]])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="num_kv_heads"):
        dc.load_pattern(path)
    path.write_text(json.dumps(dict(data, format="other")))
    with pytest.raises(ValueError, match="format"):
        dc.load_pattern(path)


# ----------------------------------------------------------------------------- tiny model


def tiny():
    return tiny_pikv(4)


def test_calibrate_tiny_model_end_to_end(tmp_path):
    cfg, m = tiny()
    prompts = dc.passkey_prompts(3, 96, vocab_size=cfg.vocab_size, seed=2)
    assert [len(p) for p in prompts] == [96] * 3
    hp = dc.calibrate(m, prompts, n_sink=2, window=16, retrieval_fraction=0.5, metadata=dict(model="tiny"))
    scores = np.asarray(hp.scores)
    assert scores.shape == (2, 2) and np.all((scores >= 0) & (scores <= 1))
    assert sum(map(sum, hp.retrieval)) == 2  # half of the 4 KV heads
    top = np.argsort(-scores.reshape(-1))[:2]
    assert all(hp.retrieval[i // 2][i % 2] for i in top)
    path = tmp_path / "p.json"
    dc.save_pattern(path, hp)
    policy = DuoAttention.from_pattern_file(path)
    assert policy.retrieval_fraction == 0.5 and policy.sparsity == 0.5
    out = m.generate([prompts[0][:40]], 3, policy=policy, stop_ids=())
    assert len(out.token_ids[0]) == 3


def trace(policy, tokens, lengths, dec):
    return model_trace(policy, tokens, lengths, dec, seed=4)


PATTERN = ((True, False), (False, True))
POLICY = DuoAttention(pattern=PATTERN, n_sink=2, window=4)
S, N = 40, 6


def _batch(seed, lengths):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    return (rng.integers(3, 97, (b, S)).astype(np.int32), np.asarray(lengths, np.int32),
            rng.integers(3, 97, (b, N)).astype(np.int32))


def test_cache_invariants_and_memory():
    cfg, _ = tiny()
    hk, d = cfg.num_key_value_heads, cfg.dim_per_head
    tokens, lengths, dec = _batch(0, [40, 23, 5])
    _, logits, wrote, pre, final = trace(POLICY, tokens, lengths, dec)
    _, _, _, full_pre, full_final = trace(CachePolicy(), tokens, lengths, dec)
    assert wrote.all() and np.all(np.isfinite(logits))
    for li, layer in enumerate(pre.layers):
        assert isinstance(layer, PooledLayerCache)
        assert layer.segments == ((0, S + N), (S + N, S + N + 6)) if PATTERN[li][0] else \
            layer.segments == ((0, 6), (6, 6 + S + N))
        # memory: retrieval heads S + N slots, streaming heads n_sink + window; 4 bytes/slot more for the head tag
        assert layer.nbytes() == 3 * (S + N + 6) * (2 * d * 4 + 3 * 4)
        assert layer.nbytes() < full_pre.layers[li].nbytes() * (S + N + 6) / (2 * (S + N)) * 1.05
    for snap, full, seen in ((pre, full_pre, lengths), (final, full_final, lengths + N)):
        for li, layer in enumerate(snap.layers):
            hp = layer.head_positions()
            for b, L in enumerate(seen):
                for h in range(hk):
                    kept = hp[b, h][hp[b, h] >= 0]
                    assert len(set(kept.tolist())) == len(kept), "duplicate positions"
                    if PATTERN[li][h]:
                        want = set(range(L))
                    else:  # sinks + the most recent window, within the streaming head's 6 slots
                        want = {p for p in range(L) if p < 2 or p > L - 1 - 4}
                        assert len(kept) <= 6
                    assert set(kept.tolist()) == want, f"layer {li} row {b} head {h}"
                # every resident entry holds its token's key and value (prompt: all layers; decoded: layer 0)
                for slot in np.nonzero(layer.pos[b] >= 0)[0]:
                    h, p = int(layer.head[b, slot]), int(layer.pos[b, slot])
                    if p < lengths[b] or li == 0:
                        np.testing.assert_allclose(layer.k[b, slot], full.layers[li].k[b, h, p], rtol=1e-5, atol=1e-5)
                        np.testing.assert_allclose(layer.v[b, slot], full.layers[li].v[b, h, p], rtol=1e-5, atol=1e-5)
    # rows are independent: other rows' prompts change nothing in row 1
    tokens2, _, dec2 = _batch(9, [40, 23, 5])
    tokens2[1], dec2[1] = tokens[1], dec[1]
    _, logits2, _, _, final2 = trace(POLICY, tokens2, np.array([12, 23, 38], np.int32), dec2)
    np.testing.assert_allclose(logits[:, 1], logits2[:, 1], rtol=1e-5, atol=1e-5)
    for a, c in zip(final.layers, final2.layers):
        np.testing.assert_array_equal(a.pos[1], c.pos[1])
        np.testing.assert_array_equal(a.k[1], c.k[1])


def prompts_and_continuations():
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 97, n).tolist() for n in (30, 17)]
    return prompts, [rng.integers(3, 97, 6).tolist() for _ in prompts]


def test_streaming_heads_with_room_reproduce_full_cache():
    """Streaming heads whose sinks + window cover the whole sequence drop nothing: generation and
    teacher-forced logits equal the full cache's (both kinds of head and the pooled attention run)."""
    _, m = tiny()
    prompts, conts = prompts_and_continuations()
    policy = DuoAttention(pattern=PATTERN, n_sink=4, window=100)
    full, duo = m.generate(prompts, 6, stop_ids=()), m.generate(prompts, 6, policy=policy, stop_ids=())
    assert duo.token_ids == full.token_ids
    lp_full, _ = m.teacher_forced(prompts, conts, full_logprobs=True)
    lp_duo, _ = m.teacher_forced(prompts, conts, policy=policy, full_logprobs=True)
    np.testing.assert_allclose(lp_duo, lp_full, rtol=1e-5, atol=1e-5)


def test_generation_with_streaming_heads_saves_memory():
    _, m = tiny()
    prompts, _ = prompts_and_continuations()
    policy = make_policy("duo_attention", pattern=[[True, False], [False, False]], n_sink=2, window=8)
    out, full = m.generate(prompts, 6, policy=policy, stop_ids=()), m.generate(prompts, 6, stop_ids=())
    assert [len(t) for t in out.token_ids] == [6, 6] and out.finish_reasons == ["max_tokens"] * 2
    # 1 of 4 heads keeps 64 + 6 slots, the other 3 keep 10: about (70 + 30) / 280 of the full cache
    assert out.stats["cache_bytes"] < 0.4 * full.stats["cache_bytes"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="pattern"):
        DuoAttention()
    with pytest.raises(ValueError, match="different numbers"):
        DuoAttention(pattern=[[True, False], [True]])
    with pytest.raises(ValueError, match="booleans"):
        DuoAttention(pattern=[[0.5, 1]])
    with pytest.raises(ValueError, match="budget"):
        DuoAttention(pattern=PATTERN, budget_ratio=0.5)
    with pytest.raises(ValueError, match="window"):
        DuoAttention(pattern=PATTERN, window=0)
    with pytest.raises(ValueError, match="n_sink"):
        DuoAttention(pattern=PATTERN, n_sink=-1)
    p = DuoAttention(pattern=[[1, 0], [0, 1]])
    assert p.pattern == PATTERN and hash(p) == hash(DuoAttention(pattern=PATTERN))
    with pytest.raises(ValueError, match="KV heads"):
        p.init_layer_cache(0, 1, 3, 10, 8, jnp.float32)
    with pytest.raises(ValueError, match="layer 2"):
        p.init_layer_cache(2, 1, 2, 10, 8, jnp.float32)


@pytest.mark.slow
def test_smollm2_calibration_and_passkey(smollm2, tmp_path):
    """SmolLM2 (30 layers x 3 KV heads): calibrate on synthetic passkey prompts, keep half the heads
    as retrieval heads, and retrieve a passkey with far less cache than the full one."""
    prompts = dc.passkey_prompts(2, 700, tokenizer=smollm2.tokenizer, seed=0)
    hp = dc.calibrate(smollm2, prompts, n_sink=16, window=64, retrieval_fraction=0.5, batch_size=2)
    assert np.asarray(hp.scores).shape == (30, 3) and sum(map(sum, hp.retrieval)) == 45
    path = tmp_path / "smollm2_duo.json"
    dc.save_pattern(path, hp)
    policy = DuoAttention.from_pattern_file(path)
    test = dc.passkey_prompts(1, 700, tokenizer=smollm2.tokenizer, seed=123)
    out = smollm2.generate(test, 8, policy=policy)
    full = smollm2.generate(test, 8)
    assert out.stats["cache_bytes"] < 0.7 * full.stats["cache_bytes"]
    key = smollm2.tokenizer.decode(test[0]).split("The pass key is ")[1].split(".")[0]
    assert key in full.texts[0]
    assert key in out.texts[0]
