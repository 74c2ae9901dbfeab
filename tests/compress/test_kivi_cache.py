"""The KIVI cache (QuantizedPolicy) in generation on a tiny random Llama: prefill, then teacher-fed
decode steps under one jitted trace, checked against the uncached keys/values of every position."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from compress_helpers import random_prompts, run_trace, tiny_model, true_kv

from pikv_jax.cache.policies import H2O, CachePolicy
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.compress.kivi import QuantizedPolicy

G, R, STEPS = 8, 16, 40
LENGTHS = (30, 45)


@functools.lru_cache(maxsize=None)
def setup():
    model = tiny_model()
    prompts = random_prompts(LENGTHS, seed=3)
    fed = np.random.default_rng(4).integers(3, 97, (len(prompts), STEPS))
    return model, prompts, fed, true_kv(model, prompts, fed)


@functools.lru_cache(maxsize=None)
def trace(policy):
    model, prompts, fed, _ = setup()
    return run_trace(model, policy, prompts, fed)


def check_resident_tokens(cache: QuantizedLayerCache, k_true, v_true, known):
    """Quantized slots within half their group's stored step of the truth; ring slots exact.

    known: i32[B], positions < known[b] have a known truth: every position in layer 0, only prompt
    positions above it (a decoded token's key in layer l > 0 depends on the compressed attention of
    the layers below, so the uncached forward is not its truth)."""
    cq = cache.quantized_slots
    k, v = (np.asarray(x) for x in cache.dense_kv())
    pos = np.asarray(cache.pos)
    ks = np.repeat(np.asarray(cache.k_scale, np.float32), G, axis=2)  # [B, Hkv, Cq, D]
    vs = np.repeat(np.asarray(cache.v_scale, np.float32), G, axis=3)
    tol = 1e-4 * max(np.abs(k_true).max(), np.abs(v_true).max())
    checked = 0
    for b, h, slot in zip(*np.nonzero(pos >= 0)):
        p = pos[b, h, slot]
        if p >= known[b]:
            continue
        ek, ev = np.abs(k[b, h, slot] - k_true[b, h, p]), np.abs(v[b, h, slot] - v_true[b, h, p])
        if slot < cq:
            assert np.all(ek <= 0.5 * ks[b, h, slot] + tol), (b, h, slot, p)
            assert np.all(ev <= 0.5 * vs[b, h, slot] + tol), (b, h, slot, p)
        else:
            assert ek.max() <= tol and ev.max() <= tol, (b, h, slot, p)
        checked += 1
    return checked


def test_residual_covering_every_token_equals_the_full_cache():
    full = trace(CachePolicy())
    kivi = trace(QuantizedPolicy(bits=4, group_size=G, residual_length=128))
    assert all(layer.quantized_slots == 0 for layer in kivi["cache"].layers)
    # after prefill the ring holds exactly the full cache's keys and values (same slots)
    for lk, lf in zip(kivi["prefill_cache"].layers, full["prefill_cache"].layers):
        c = lf.capacity
        np.testing.assert_array_equal(lk.pos[:, :, :c], lf.pos)
        real = np.asarray(lf.pos)[..., None] >= 0  # padding slots: empty in both, contents irrelevant
        np.testing.assert_array_equal(np.where(real, lk.k_res[:, :, :c], 0), np.where(real, lf.k, 0))
        np.testing.assert_array_equal(np.where(real, lk.v_res[:, :, :c], 0), np.where(real, lf.v, 0))
    # decoding matches up to float32 reassociation (the attention concatenates an empty quantized part)
    np.testing.assert_array_equal(kivi["prefill_logits"], full["prefill_logits"])
    np.testing.assert_allclose(kivi["logits"], full["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_tokens_dequantize_within_half_a_step_and_each_position_is_kept_once(bits):
    model, prompts, fed, kv = setup()
    out = trace(QuantizedPolicy(bits=bits, group_size=G, residual_length=R))
    assert bool(np.all(out["wrote"]))
    lengths = np.array(LENGTHS) + STEPS
    np.testing.assert_array_equal(out["cache"].length, lengths)
    for i, (layer, (k_true, v_true)) in enumerate(zip(out["cache"].layers, kv)):
        assert layer.quantized_slots > 0 and layer.bits == bits
        known = lengths if i == 0 else np.array(LENGTHS)
        assert check_resident_tokens(layer, k_true, v_true, known) == int(known.sum()) * layer.num_kv_heads
        pos = np.asarray(layer.pos)
        for b, n in enumerate(lengths):
            for h in range(layer.num_kv_heads):
                np.testing.assert_array_equal(np.sort(pos[b, h][pos[b, h] >= 0]), np.arange(n))
        # the ring holds the newest tokens in full precision
        ring = pos[:, :, layer.quantized_slots:]
        assert np.all(ring.max(axis=-1) == (lengths - 1)[:, None])
    # bytes are those of the arrays actually stored
    cache = out["cache"]
    assert cache.nbytes() == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(cache))


def test_evicting_inner_policy_evicts_whole_groups_and_protects_sinks_and_recent_tokens():
    model, prompts, fed, kv = setup()
    inner = H2O(budget_tokens=40)
    policy = QuantizedPolicy(inner=inner, bits=4, group_size=G, residual_length=R)
    out = trace(policy)
    window = inner.recent_window(40)
    assert window == 18
    evictions = 0
    for i, layer in enumerate(out["cache"].layers):
        cq, cap = layer.quantized_slots, layer.capacity
        assert cap == 40 and cq == 24
        snaps = [np.asarray(out["prefill_cache"].layers[i].pos)] + list(np.asarray(out["pos_hist"][i]))
        for t in range(1, len(snaps)):
            prev, cur = snaps[t - 1], snaps[t]
            for b, n in enumerate(LENGTHS):
                q = n + t - 1  # position written at this step
                for h in range(cur.shape[1]):
                    res = cur[b, h][cur[b, h] >= 0]
                    assert len(res) == len(set(res)) <= cap
                    assert set(range(4)) <= set(res)  # sinks
                    assert set(range(q - window + 1, q + 1)) <= set(res)  # recent window
                    gone = set(prev[b, h][prev[b, h] >= 0]) - set(res)
                    if gone:
                        evictions += 1
                        groups = [set(prev[b, h, g * G:(g + 1) * G]) for g in range(cq // G)]
                        assert len(gone) == G and gone in groups, (t, b, h, gone)
        check_resident_tokens(layer, *kv[i], np.array(LENGTHS) + (STEPS if i == 0 else 0))
    assert evictions > 0


def test_cache_bytes_are_what_is_allocated():
    policy = QuantizedPolicy(inner=H2O(budget_tokens=40), bits=4, group_size=G, residual_length=R)
    cache = init_policy_cache(policy, 2, (40, 40), num_kv_heads=2, head_dim=16, dtype=np.float32)
    assert cache.nbytes() == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(cache))
    full = init_policy_cache(CachePolicy(), 2, (40, 40), num_kv_heads=2, head_dim=16, dtype=np.float32)
    assert cache.nbytes() < full.nbytes()
