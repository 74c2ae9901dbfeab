"""Expert-sharded KV storage (pikv_jax/cache/policies/expert_kv.py) against independent truths.

- exact mode (top_k=None) and top_k = G with room for every token: greedy ids equal the Full cache's;
- routed attention (read=gather and read=mask) equals a NumPy reference that attends only over the
  selected shards' tokens (plus sinks and the newest token), and the gather's jaxpr multiplies only
  k * Cs + extras slots, not the cache;
- after prefill and decode under eviction: no shard over its Cs slots, no duplicate positions, sinks
  and the recent window resident, the shard loads equal the resident tokens, and resident + evicted
  = tokens seen for every (layer, row, KV head) (nothing dropped silently);
- with room everywhere each token sits in the shard of its nearest centroid;
- capacity-aware placement (hypothesis): every kept token placed, no shard over capacity, a token
  outside its first choice only when that shard is full;
- generation stats: shard loads sum to the tokens stored; routed reads fewer KV bytes;
- bad arguments give one-line ValueErrors naming the argument and the allowed values.
The generic policy invariants (test_policy_properties.py, test_policy_full_budget.py) also run on
expert_kv through the registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import policy_helpers as ph
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pikv_jax.cache.policies import CachePolicy, ExpertKV, init_policy_cache
from pikv_jax.cache.policies.expert_kv import place_in_shards
from pikv_jax.cache.state import init_layer_cache
from pikv_jax.eval.methods import parse_method
from pikv_jax.runtime import forward

VOCAB = ph.tiny_model()[0].vocab_size


# ------------------------------------------------------------------------------ generation vs full


@pytest.fixture(scope="module")
def runs():
    cfg, model = ph.tiny_pikv(3)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (37, 20)]
    full = model.generate(prompts, max_new_tokens=6, policy=CachePolicy(), stop_ids=())
    out = {spec: model.generate(prompts, max_new_tokens=6, stop_ids=(),
                                policy=parse_method(spec, model=model).policy)
           for spec in ("expert_kv(shards=4)", "expert_kv(shards=4,top_k=4)", "expert_kv(shards=4,top_k=1)@16t")}
    return cfg, full, out


def test_exact_and_all_shards_routed_equal_the_full_cache(runs):
    _, full, out = runs
    assert out["expert_kv(shards=4)"].token_ids == full.token_ids
    assert out["expert_kv(shards=4,top_k=4)"].token_ids == full.token_ids


def test_stats_loads_sum_to_the_tokens_stored_and_routed_reads_less(runs):
    cfg, full, out = runs
    heads_layers = cfg.num_key_value_heads * cfg.num_hidden_layers
    seen = full.stats["seen_tokens"]
    exact = out["expert_kv(shards=4)"].stats
    assert exact["evicted_tokens"] == 0 and sum(exact["shard_tokens"]) == heads_layers * seen
    assert exact["kv_bytes_read_per_step"] == exact["kv_bytes_read_per_step_all_shards"]
    routed = out["expert_kv(shards=4,top_k=1)@16t"].stats
    assert routed["evicted_tokens"] > 0
    assert routed["evicted_tokens"] + sum(routed["shard_tokens"]) == heads_layers * seen
    assert max(routed["shard_tokens"]) <= heads_layers * 2 * 4  # 16 slots = 4 shards of 4, 2 rows
    assert routed["shard_load_max_over_mean"] >= 1.0
    assert routed["kv_bytes_read_per_step"] < routed["kv_bytes_read_per_step_all_shards"]


# ------------------------------------------------------------------------------ routed attention


def _random_cache(policy: ExpertKV, rng, b=2, hk=2, cap=32, d=8):
    """A filled cache: random keys/values/centroids, distinct positions, some empty slots."""
    cache = policy.init_layer_cache(0, b, hk, cap, d, jnp.float32)
    g, cs = policy.shards, cap // policy.shards
    pos = np.full((b, hk, cap), -1, np.int32)
    for i in range(b):
        for h in range(hk):
            n = rng.integers(cap // 2, cap + 1)
            slots = rng.choice(cap, n, replace=False)
            pos[i, h, slots] = rng.permutation(n)
    load = (pos >= 0).reshape(b, hk, g, cs).sum(-1)
    sink = np.full((b, hk, policy.n_sink), -1, np.int32)
    newest = np.zeros((b, hk), np.int32)
    for i in range(b):
        for h in range(hk):
            for p in range(policy.n_sink):
                sink[i, h, p] = np.flatnonzero(pos[i, h] == p)[0]
            newest[i, h] = np.argmax(pos[i, h])
    extra = dict(cache.extra, centroids=jnp.asarray(rng.normal(size=(b, hk, g, d)), jnp.float32),
                 load=jnp.asarray(load, jnp.int32), sink_slot=jnp.asarray(sink), newest_slot=jnp.asarray(newest))
    return cache.replace(k=jnp.asarray(rng.normal(size=(b, hk, cap, d)), jnp.float32),
                         v=jnp.asarray(rng.normal(size=(b, hk, cap, d)), jnp.float32),
                         pos=jnp.asarray(pos), extra=extra)


def _reference_attend(policy: ExpertKV, cache, q, q_pos):
    """NumPy: per (row, KV head) pick the top-k non-empty shards by the group mean of q . c_g,
    attend over their tokens, the sinks and the newest token."""
    k, v, pos = (np.asarray(x, np.float64) for x in (cache.k, cache.v, cache.pos))
    cent, load = np.asarray(cache.extra["centroids"], np.float64), np.asarray(cache.extra["load"])
    q = np.asarray(q, np.float64)
    b, hk, cap, d = k.shape
    h = q.shape[1]
    grp, cs = h // hk, cap // policy.shards
    out, mass = np.zeros((b, h, d)), np.zeros((b, hk, cap))
    for i in range(b):
        for j in range(hk):
            qs = q[i, j * grp:(j + 1) * grp]  # [G, D]
            score = (qs @ cent[i, j].T).mean(0)
            score[load[i, j] == 0] = -np.inf
            chosen = np.argsort(-score, kind="stable")[: policy.top_k]
            attended = np.zeros(cap, bool)
            for s in chosen:
                attended[s * cs:(s + 1) * cs] = True
            attended |= (pos[i, j] >= 0) & ((pos[i, j] < policy.n_sink) | (pos[i, j] == pos[i, j].max()))
            ok = attended & (pos[i, j] >= 0) & (pos[i, j] <= q_pos[i])
            logits = qs @ k[i, j].T / np.sqrt(d)  # [G, C]
            logits[:, ~ok] = -np.inf
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[i, j * grp:(j + 1) * grp] = p @ v[i, j]
            mass[i, j] = p.mean(0)
    return out, mass


@pytest.mark.parametrize("top_k, read", [(1, "gather"), (2, "gather"), (1, "mask"), (2, "mask")])
def test_routed_attention_equals_a_reference_over_the_selected_shards(top_k, read):
    rng = np.random.default_rng(top_k)
    policy = ExpertKV(shards=4, top_k=top_k, n_sink=2, read=read)
    cache = _random_cache(policy, rng)
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    q_pos = jnp.asarray([40, 40], jnp.int32)
    out, mass = jax.jit(lambda c, q: policy.attend(0, c, q, q_pos))(cache, q)
    want_out, want_mass = _reference_attend(policy, cache, q, np.asarray(q_pos))
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mass), want_mass, rtol=1e-5, atol=1e-6)


def test_all_shards_routed_equals_exact_attention():
    rng = np.random.default_rng(7)
    cache = _random_cache(ExpertKV(shards=4, top_k=4, n_sink=2), rng)
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    q_pos = jnp.asarray([40, 40], jnp.int32)
    routed = ExpertKV(shards=4, top_k=4, n_sink=2).attend(0, cache, q, q_pos)
    exact = ExpertKV(shards=4, top_k=None, n_sink=2).attend(0, cache, q, q_pos)
    for a, b in zip(routed, exact):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_routed_attention_multiplies_only_the_gathered_slots():
    policy = ExpertKV(shards=4, top_k=1, n_sink=2)  # C = 64 slots, 16 per shard: reads 16 + 2 sinks + 1
    cache = _random_cache(policy, np.random.default_rng(0), cap=64)
    q = jnp.ones((2, 4, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda c, q: policy.attend(0, c, q, jnp.asarray([70, 70])))(cache, q)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    sizes = {tuple(v.aval.shape) for e in dots for v in e.invars}
    assert dots and all(64 not in s for s in sizes), sizes
    assert any(19 in s for s in sizes), sizes


# ------------------------------------------------------------------------------ cache invariants


def _check_cache(policy: ExpertKV, layer_cache, lengths_seen, window: int):
    pos = np.asarray(layer_cache.pos)
    b, hk, cap = pos.shape
    cs = cap // policy.shards
    load = np.asarray(layer_cache.extra["load"])
    evicted = np.asarray(layer_cache.extra["evicted"])
    per_shard = (pos >= 0).reshape(b, hk, policy.shards, cs).sum(-1)
    np.testing.assert_array_equal(load, per_shard)  # loads are the resident tokens of each shard block
    for i in range(b):
        seen = int(lengths_seen[i])
        for h in range(hk):
            p = pos[i, h][pos[i, h] >= 0]
            assert len(set(p.tolist())) == len(p), "duplicate positions"
            assert len(p) + evicted[i, h] == seen, "a token was neither stored nor counted as evicted"
            protected = set(range(min(policy.n_sink, seen))) | set(range(max(seen - window, 0), seen))
            assert protected <= set(p.tolist()), f"protected {sorted(protected - set(p.tolist()))} lost"


@pytest.mark.parametrize("evict", ["h2o", "streaming_llm"])
def test_eviction_keeps_shards_within_capacity_sinks_and_window_and_counts_every_token(evict):
    policy = ExpertKV(shards=4, top_k=2, evict=evict, n_sink=2, budget_tokens=8)
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, VOCAB, (2, 16)).astype(np.int32)
    lengths = np.array([16, 11], np.int32)
    dec = rng.integers(3, VOCAB, (2, 6)).astype(np.int32)
    _, _, wrote, after_prefill, final = ph.model_trace(policy, tokens, lengths, dec, seed=3)
    assert wrote.all()
    window = policy.recent_window(after_prefill.layers[0].capacity)
    for layer in range(len(final.layers)):
        _check_cache(policy, after_prefill.layers[layer], lengths, policy.recent_window(8))
        _check_cache(policy, final.layers[layer], lengths + 6, window)


def test_with_room_everywhere_each_token_is_in_its_nearest_centroids_shard():
    policy = ExpertKV(shards=2, n_sink=0)
    cfg, m = ph.tiny_pikv(3)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(3, VOCAB, (1, 12)), jnp.int32)
    # 2 x 14 slots: either shard alone holds the 12 prompt tokens and 2 decoded ones
    cache = init_policy_cache(policy, 1, (28,) * cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=jnp.float32)

    @jax.jit
    def run(params, cache):
        model = nnx.merge(m.graphdef, params)
        _, cache = forward.prefill(model, tokens, jnp.asarray([12]), cache, policy)
        for t in (5, 9):
            _, cache, _ = forward.decode_step(model, cache, jnp.asarray([t]), jnp.asarray([True]), policy)
        return cache

    for layer in run(m.params, cache).layers:
        k, pos = np.asarray(layer.k), np.asarray(layer.pos)
        cent = np.asarray(layer.extra["centroids"])
        assert np.asarray(layer.extra["spilled"]).sum() == 0 and (pos >= 0).sum(-1).min() == 14
        for h in range(pos.shape[1]):
            slots = np.flatnonzero(pos[0, h] >= 0)
            dist = ((k[0, h, slots, None, :] - cent[0, h, None]) ** 2).sum(-1)
            np.testing.assert_array_equal(slots // 14, dist.argmin(-1))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_capacity_aware_placement_fills_first_choices_then_spills(cs, seed):
    rng = np.random.default_rng(seed)
    g, s = 4, 23  # fixed shapes (one compilation); up to g * cs <= 20 tokens kept
    ranking = np.stack([rng.permutation(g) for _ in range(s)])[None, None]  # [1, 1, S, G]
    keep = np.zeros(s, bool)
    keep[rng.choice(s, rng.integers(0, g * cs + 1), replace=False)] = True
    shard = np.asarray(place_in_shards(jnp.asarray(ranking, jnp.int32), jnp.asarray(keep)[None, None], cs))[0, 0]
    assert ((shard >= 0) == keep).all(), "every kept token placed, nothing else"
    counts = np.bincount(shard[shard >= 0], minlength=g)
    assert (counts <= cs).all()
    for t in np.flatnonzero(keep & (shard != ranking[0, 0, :, 0])):
        assert counts[ranking[0, 0, t, 0]] == cs, "spilled although its first choice had room"


# ------------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize("make, match", [
    (lambda: ExpertKV(top_k=0), r"top_k=0 is outside \[1, shards=4\]"),
    (lambda: ExpertKV(shards=2, top_k=3), r"top_k=3 is outside \[1, shards=2\]"),
    (lambda: ExpertKV(evict="lru"), r"evict='lru' is not supported; allowed: h2o, streaming_llm"),
    (lambda: ExpertKV(shards=0), r"shards must be an integer >= 1"),
    (lambda: ExpertKV(top_k=1, read="copy"), r"read='copy' is not supported; allowed: gather, mask"),
    (lambda: ExpertKV(budget_tokens=64, evict_every=2), r"evict_every must be 1"),
    (lambda: ExpertKV(shards=4).init_layer_cache(0, 1, 2, 10, 8, jnp.float32),
     r"shards=4 does not divide the cache capacity 10"),
    (lambda: parse_method("expert_kv(top_k=9)"), r"top_k=9 is outside"),
])
def test_bad_arguments_raise_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_method_string_parses_top_k_all_and_budgets():
    m = parse_method("expert_kv(shards=2,top_k=all,evict=streaming_llm)@0.5")
    assert isinstance(m.policy, ExpertKV) and m.policy.top_k is None and m.policy.budget_ratio == 0.5
    assert m.policy.shards == 2 and m.policy.evict == "streaming_llm"
    assert parse_method("expert_kv").policy.capacity_for(0, 30, 5) == 36  # rounded up to whole shards
    init_layer_cache(1, 1, 36, 4, jnp.float32)  # (the capacity a layer is then built with)
