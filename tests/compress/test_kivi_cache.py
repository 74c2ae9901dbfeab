"""The KIVI cache (QuantizedPolicy) in generation on a tiny random Llama: prefill, then teacher-fed
decode steps under one jitted trace, checked against the uncached keys/values of every position;
generation with any budget and prompt length (a cache within the ring is a ring of full-precision
slots); protected tokens never evicted, also when every quantized group holds one (a constructed
case and a property test over random configurations)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compress_helpers import random_prompts, run_trace, tiny_model, true_kv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pikv_jax.cache.policies import H2O, AdaKV, CachePolicy, Knorm, StreamingLLM, make_policy
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.compress import QuantizedCompressor
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
    """Quantized slots within half their group's stored step of the truth; ring slots exact up to
    the rounding to the ring's dtype (bfloat16 by default).

    known: i32[B], positions < known[b] have a known truth: every position in layer 0, only prompt
    positions above it (a decoded token's key in layer l > 0 depends on the compressed attention of
    the layers below, so the uncached forward is not its truth)."""
    cq = cache.quantized_slots
    k, v = (np.asarray(x) for x in cache.dense_kv())
    pos = np.asarray(cache.pos)
    ks = np.repeat(np.asarray(cache.k_scale, np.float32), G, axis=2)  # [B, Hkv, Cq, D]
    vs = np.repeat(np.asarray(cache.v_scale, np.float32), G, axis=3)
    tol = 1e-4 * max(np.abs(k_true).max(), np.abs(v_true).max())
    ring_eps = float(jnp.finfo(cache.k_res.dtype).eps) if cache.k_res.dtype != np.float32 else 0.0
    checked = 0
    for b, h, slot in zip(*np.nonzero(pos >= 0)):
        p = pos[b, h, slot]
        if p >= known[b]:
            continue
        ek, ev = np.abs(k[b, h, slot] - k_true[b, h, p]), np.abs(v[b, h, slot] - v_true[b, h, p])
        if slot < cq:
            # decoded tokens pass through the ring: rounded to its dtype, then quantized
            assert np.all(ek <= 0.5 * ks[b, h, slot] + tol + ring_eps * np.abs(k_true[b, h, p])), (b, h, slot, p)
            assert np.all(ev <= 0.5 * vs[b, h, slot] + tol + ring_eps * np.abs(v_true[b, h, p])), (b, h, slot, p)
        else:
            assert np.all(ek <= tol + ring_eps * np.abs(k_true[b, h, p])), (b, h, slot, p)
            assert np.all(ev <= tol + ring_eps * np.abs(v_true[b, h, p])), (b, h, slot, p)
        checked += 1
    return checked


def test_residual_covering_every_token_equals_the_full_cache():
    full = trace(CachePolicy())
    kivi = trace(QuantizedPolicy(bits=4, group_size=G, residual_length=128, ring_dtype=None))  # ring in f32
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


# ---------------------------------------------------------------------------------------------
# any budget, any prompt length


@pytest.mark.parametrize("inner", [make_policy("h2o", budget_ratio=0.5), make_policy("streaming_llm", budget_ratio=0.5),
                                   H2O(budget_tokens=20), CachePolicy()], ids=lambda p: p.label)
def test_generate_with_a_budget_below_the_ring(inner):
    """The seed guide's flow: QuantizedCompressor(bits=4).as_policy(h2o at 50%) on a short prompt
    (G = 8 for the tiny model's head_dim of 16): the cache, well under the default residual_length=64, is a
    ring of full-precision slots and generation runs to max_new_tokens."""
    model = tiny_model()
    policy = QuantizedCompressor(bits=4, group_size=G).as_policy(inner)  # residual_length=64
    prompts = random_prompts((23, 9), seed=5)
    out = model.generate(prompts, max_new_tokens=24, policy=policy, stop_ids=())
    assert out.finish_reasons == ["max_tokens", "max_tokens"]
    assert [len(t) for t in out.token_ids] == [24, 24]


def test_ring_only_cache_evicts_like_its_policy():
    """A budget within the ring: no quantized slots, per-slot eviction with sinks and the recent
    window resident at every step, never more tokens than the budget."""
    inner = H2O(budget_tokens=20)
    out = trace(QuantizedPolicy(inner=inner, bits=4, group_size=G, residual_length=R * 2))
    window = inner.recent_window(20)
    assert bool(np.all(out["wrote"]))
    for i, layer in enumerate(out["cache"].layers):
        assert layer.quantized_slots == 0 and layer.residual_slots == 20 and layer.k_res.dtype == jnp.bfloat16
        for t, cur in enumerate(np.asarray(out["pos_hist"][i])):
            for b, n in enumerate(LENGTHS):
                q = n + t
                for h in range(cur.shape[1]):
                    res = set(cur[b, h][cur[b, h] >= 0])
                    assert len(res) == 20 and set(range(4)) <= res and set(range(q - window + 1, q + 1)) <= res


# ---------------------------------------------------------------------------------------------
# protected tokens are never evicted


def _every_group_protected(window: int):
    """One quantized group holding the sinks (positions 0..7) and a full ring (8..23); the next
    token is position 24. Returns (policy, cache)."""
    g, r = 8, 16
    inner = H2O(budget_tokens=30, window=window)
    policy = QuantizedPolicy(inner=inner, bits=4, group_size=g, residual_length=r)
    cache = policy.init_layer_cache(0, 1, 2, 24, 16, jnp.float32)
    assert cache.quantized_slots == g
    ring = (jnp.arange(r) + 5) % r  # the ring starts at slot 11
    cache = cache.replace(pos=jnp.broadcast_to(jnp.concatenate([jnp.arange(g), 8 + ring]), (1, 2, g + r)),
                          score=jnp.linspace(1.0, 2.0, g + r)[None, None].repeat(2, axis=1),
                          ring_start=jnp.full((1, 2), 11, jnp.int32), ring_count=jnp.full((1, 2), r, jnp.int32),
                          q_count=jnp.full((1, 2), g, jnp.int32))
    return policy, cache


def test_every_group_protected_evicts_the_rings_oldest_token():
    policy, cache = _every_group_protected(window=0)  # H2O's window: 10 newest positions (15..24)
    assert policy.inner.recent_window(24) == 10
    q_pos = jnp.array([24], jnp.int32)
    new, slot, ok = jax.jit(policy.decode_slot, static_argnums=0)(0, cache, q_pos)
    assert bool(ok[0])
    pos = np.asarray(new.pos)
    np.testing.assert_array_equal(pos[:, :, :8], np.asarray(cache.pos)[:, :, :8])  # the sinks' group stays
    assert 8 not in pos and np.all(np.asarray(slot) == 8 + 11)  # the oldest ring token (8, slot 11) went
    np.testing.assert_array_equal(new.ring_start, 12)
    np.testing.assert_array_equal(new.ring_count, 15)


def test_every_token_protected_reports_the_row_full():
    policy, cache = _every_group_protected(window=20)  # positions 5..24 protected: the ring's oldest too
    new, _, ok = jax.jit(policy.decode_slot, static_argnums=0)(0, cache, jnp.array([24], jnp.int32))
    assert not bool(ok[0])
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(cache)):
        np.testing.assert_array_equal(a, b)


@functools.lru_cache(maxsize=None)
def _decode_run(policy, capacity: int, steps: int):
    """jitted (seed) -> (pos i32[steps, B, Hkv, C] after each step, ok bool[steps, B]): decode from an
    empty cache, random keys / values and attention mass, rows stop at their first full step."""
    b, hk, d = 2, 2, 8

    def run(seed):
        cache = policy.init_layer_cache(0, b, hk, capacity, d, jnp.float32)

        def step(carry, t):
            cache, active, key = carry
            key, kk, kv, km = jax.random.split(key, 4)
            q_pos = jnp.full((b,), t, jnp.int32)
            cache, slot, ok = policy.decode_slot(0, cache, q_pos)
            active = active & ok
            k, v = jax.random.normal(kk, (2, b, hk, d))
            cache = policy.write(0, cache, k, v, q_pos, slot, active)
            mass = jax.random.uniform(km, cache.pos.shape) * (cache.pos >= 0)
            cache = policy.observe(0, cache, mass, q_pos, active)
            return (cache, active, key), (cache.pos, active)

        carry = (cache, jnp.ones((b,), bool), jax.random.key(seed))
        return jax.lax.scan(step, carry, jnp.arange(steps))[1]

    return jax.jit(run)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=st.sampled_from([4, 8]), rings=st.integers(1, 3), budget=st.integers(10, 56), n_sink=st.integers(0, 4),
       recent=st.sampled_from([0.0, 0.3, 0.5, 0.9]), streaming=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sinks_and_recent_window_always_resident(g, rings, budget, n_sink, recent, streaming, seed):
    steps = 64
    inner = (StreamingLLM(budget_tokens=budget, n_sink=n_sink) if streaming
             else H2O(budget_tokens=budget, n_sink=n_sink, recent_ratio=recent))
    policy = QuantizedPolicy(inner=inner, bits=4, group_size=g, residual_length=g * rings)
    cap = policy.init_layer_cache(0, 1, 1, budget, 8, jnp.float32).capacity
    window = inner.recent_window(cap)
    pos_hist, ok_hist = (np.asarray(x) for x in _decode_run(policy, budget, steps)(seed))
    for t in range(steps):
        for b in range(pos_hist.shape[1]):
            if not ok_hist[t, b]:
                continue  # the row is full (stopped) from here on: nothing protected was evicted
            for h in range(pos_hist.shape[2]):
                res = pos_hist[t, b, h][pos_hist[t, b, h] >= 0]
                assert len(res) == len(set(res)) <= cap
                must = set(range(min(n_sink, t + 1))) | set(range(max(t - window + 1, 0), t + 1))
                assert must <= set(res), (t, b, h, sorted(must - set(res)))
    assert ok_hist[:, 0].any()


@pytest.mark.parametrize("inner", [AdaKV(budget_ratio=0.25), AdaKV(budget_ratio=0.25, scorer=Knorm())],
                         ids=lambda p: p.label)
def test_pooled_inner_policies_are_refused_clearly(inner):
    """KIVI stores the uniform layout's slots; a pooled policy (AdaKV) cannot be wrapped, and the
    error says so instead of a pool-size mismatch deep in the prefill."""
    with pytest.raises(ValueError, match="cannot wrap adakv.* pooled layout"):
        QuantizedPolicy(bits=4, inner=inner)
