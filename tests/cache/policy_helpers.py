"""Shared helpers of the cache-policy tests (tests/cache/test_policy_*.py, test_streaming_reindex.py).

A tiny random Llama (2 layers, 4 query / 2 KV heads, head dim 16), one jitted "trace" that runs
prefill plus `n_steps` teacher-fed decode steps under a policy and returns a snapshot of every
layer's cache after prefill and after each step, the uncached keys/values the cache must hold, and
the per-policy knowledge the invariant checks need (budgets, protected windows, which policies
compress the prompt or evict at decode).

Policies are built generically from the registry (`POLICIES`), so policies registered later are
tested without editing these files; `POLICY_OPTIONS` only shrinks defaults that do not fit a tiny
model (observation windows of 64 tokens).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
from flax import nnx

from pikv_jax.api import PiKVModel
from pikv_jax.attention import dispatch
from pikv_jax.cache.policies import H2O, POLICIES, Composite, SnapKV, init_policy_cache, policy_class
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.config import tiny_config
from pikv_jax.models.weights import build_model
from pikv_jax.runtime import forward

NUM_LAYERS = 2
OBS_WINDOW = 4  # SnapKV / PyramidKV / AdaKV observation window, LRU prefill window: fits tiny prompts
COMPOSITE = "snapkv+h2o"  # Composite(prefill_policy=SnapKV(...), decode_policy=H2O())

# Tiny-model values for options whose defaults assume real models (only set when the class has the field).
TINY_OPTIONS = dict(obs_window=OBS_WINDOW, observe_window=OBS_WINDOW, page_size=4, token_budget=8, dense_layers=1)
BIG_WINDOW = 16  # a default recent window larger than this is shrunk to OBS_WINDOW (DuoAttention's 256)


@functools.lru_cache(maxsize=None)
def tiny_model(num_layers: int = NUM_LAYERS, seed: int = 11):
    """(config, HF-named numpy weights, graphdef, params) of a tiny random Llama."""
    cfg = tiny_config("llama", num_hidden_layers=num_layers)
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=seed)
    graphdef, params = nnx.split(build_model(cfg, weights))
    return cfg, weights, graphdef, params


def policy_names() -> list[str]:
    """Every registered policy plus the SnapKV-at-prefill / H2O-at-decode composition."""
    return sorted(POLICIES) + [COMPOSITE]


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def scores_prompt(cls) -> bool:
    """The policy can rank prompt tokens (or prefills its own way), so a prompt budget may apply."""
    return cls.prefill_scores is not CachePolicy.prefill_scores or cls.prefill is not CachePolicy.prefill


def _constructs(cls, **opts) -> bool:
    try:
        cls(**opts)
        return True
    except (ValueError, TypeError):
        return False


@functools.lru_cache(maxsize=None)
def capabilities(name: str) -> dict:
    """What a registered policy accepts, probed by construction: prompt budgets, decode eviction,
    evict_every > 1 (Quest and DuoAttention reject budgets; AdaKV rejects decode eviction)."""
    cls = policy_class(name)
    base = tiny_options(cls)
    budget = scores_prompt(cls) and _constructs(cls, **base, budget_tokens=10**6)
    evict = budget and _constructs(cls, **base, budget_tokens=10**6, decode_evict=True)
    every = evict and _constructs(cls, **base, budget_tokens=10**6, decode_evict=True, evict_every=2)
    return dict(budget=budget, decode_evict=evict, evict_every=every)


def tiny_options(cls, num_layers: int = NUM_LAYERS) -> dict:
    fields = _fields(cls)
    opts = {k: v for k, v in TINY_OPTIONS.items() if k in fields}
    if "num_layers" in fields:
        opts["num_layers"] = num_layers
    if "num_query_heads" in fields:  # Expected Attention's decode-time statistics
        opts["num_query_heads"] = tiny_model(num_layers)[0].num_attention_heads
    if "pattern" in fields:  # DuoAttention: one retrieval and one streaming KV head per layer
        opts["pattern"] = tuple((l % 2 == 0, l % 2 == 1) for l in range(num_layers))
    w = fields.get("window")
    if w is not None and isinstance(w.default, int) and w.default > BIG_WINDOW:
        opts["window"] = OBS_WINDOW
    return opts


def build_policy(name: str, *, budget_tokens=None, budget_ratio=None, n_sink=4, evict_every=1,
                 decode_evict=True, num_layers: int = NUM_LAYERS, **extra) -> CachePolicy:
    """A policy by registry name (or COMPOSITE) with options that fit the tiny model.

    Options a policy rejects by design are left out (probed by `capabilities`): no budget for
    policies that keep every token (Full, Quest) or whose budget is their head pattern
    (DuoAttention); decode_evict=True only where allowed (so prefill-only selectors like SnapKV
    are exercised at decode too); decode_evict=None keeps the policy's default.
    """
    if name == COMPOSITE:
        pre = SnapKV(budget_tokens=budget_tokens, budget_ratio=budget_ratio, n_sink=n_sink, obs_window=OBS_WINDOW)
        return Composite(prefill_policy=pre, decode_policy=H2O(n_sink=n_sink, evict_every=evict_every))
    cls = policy_class(name)
    caps = capabilities(name)
    opts = dict(tiny_options(cls, num_layers), n_sink=n_sink)
    if caps["budget"]:
        opts.update(budget_tokens=budget_tokens, budget_ratio=budget_ratio)
    if caps["decode_evict"] and decode_evict is not None:
        opts["decode_evict"] = decode_evict
    if caps["evict_every"]:
        opts["evict_every"] = evict_every
    opts.update(extra)
    return cls(**opts)


def parts(policy: CachePolicy) -> tuple[CachePolicy, CachePolicy]:
    """(policy that selects the prompt, policy that owns decode)."""
    if isinstance(policy, Composite):
        return policy.prefill_policy, policy.decode_policy
    return policy, policy


def compresses_prompt(policy: CachePolicy, prompt_len: int) -> bool:
    pre, _ = parts(policy)
    return pre.has_budget and not pre.keeps_whole_prompt(prompt_len)


def head_rules(policy: CachePolicy, layer: int, num_kv_heads: int, lengths, prompt_len: int, n_steps: int,
               head_dim: int = 16) -> list[dict]:
    """Per KV head of `layer`, what the policy promises (read by the invariant checks):

    cap: most tokens the head may hold; exact: the head's count is fixed by the rules below (False
    for pools whose heads share slots dynamically, where only the row total is fixed);
    compresses / row_budget i32[B] / n_sink_pre / window_pre: prompt selection and its protected
    tokens; evicts / n_sink_dec / window_dec / evict_every: decode-time eviction.
    """
    pre, dec = parts(policy)
    cap = policy.capacity_for(layer, prompt_len, n_steps)
    layout = policy.init_layer_cache(layer, 1, num_kv_heads, cap, head_dim, jnp.float32)
    shared_pool = hasattr(layout, "head") and getattr(layout, "segments", None) is None
    lengths = np.asarray(lengths)
    if hasattr(policy, "layer_pattern"):  # DuoAttention: retrieval heads keep all, streaming heads sink + window
        out = []
        for retrieval in policy.layer_pattern(layer, num_kv_heads):
            if retrieval:
                out.append(dict(cap=cap, exact=True, compresses=False, evicts=False))
            else:
                n = min(policy.n_sink + policy.window, cap)
                prot = np.array([len(_protected(L - 1, policy.n_sink, policy.window)) for L in lengths])
                out.append(dict(cap=n, exact=True, compresses=True, row_budget=prot, n_sink_pre=policy.n_sink,
                                window_pre=policy.window, evicts=True, n_sink_dec=policy.n_sink,
                                window_dec=policy.window, evict_every=1))
        return out
    r = dict(cap=cap, exact=not shared_pool, compresses=compresses_prompt(policy, prompt_len),
             evicts=bool(dec.decode_evict), n_sink_pre=pre.n_sink, n_sink_dec=dec.n_sink,
             evict_every=dec.evict_every)
    if r["compresses"]:
        budget = pre.layer_budget(layer, prompt_len)
        r["row_budget"] = np.asarray(pre.row_budget(layer, jnp.asarray(lengths), prompt_len))
        r["window_pre"] = pre.recent_window(budget)
    if r["evicts"]:
        r["window_dec"] = dec.recent_window(cap - (dec.evict_every - 1))
    return [dict(r) for _ in range(num_kv_heads)]


def _protected(q: int, n_sink: int, window: int) -> set[int]:
    """Positions protected when the newest token is at q: sinks and the `window` most recent."""
    return {p for p in range(q + 1) if p < n_sink or p > q - window}


# ---------------------------------------------------------------------------------------------- runs


def head_kv(layer):
    """(k, v) laid out like `head_positions()` ([B, Hkv, C', D]), or None for layouts without such
    a view (e.g. quantized codes). Pools ([B, P, D] with head_positions [B, Hkv, P]) are broadcast."""
    hp = layer.head_positions()
    k, v = getattr(layer, "k", None), getattr(layer, "v", None)
    if k is None or v is None or k.shape != v.shape:
        return None
    if k.ndim == 4 and k.shape[:3] == hp.shape:
        return k, v
    if k.ndim == 3 and k.shape[:2] == (hp.shape[0], hp.shape[2]):
        shape = (hp.shape[0], hp.shape[1]) + k.shape[1:]
        return jnp.broadcast_to(k[:, None], shape), jnp.broadcast_to(v[:, None], shape)
    return None


def snapshot(cache):
    """What the invariant checks read from a cache: lengths, per-layer positions and keys/values."""
    kv = tuple(head_kv(layer) for layer in cache.layers)
    score = tuple(layer.score if getattr(layer, "score", None) is not None
                  and layer.score.shape == layer.head_positions().shape else None for layer in cache.layers)
    return dict(length=cache.length, score=score,
                pos=tuple(layer.head_positions() for layer in cache.layers),
                resident=tuple(layer.resident_per_head() for layer in cache.layers),
                k=tuple(None if x is None else x[0] for x in kv),
                v=tuple(None if x is None else x[1] for x in kv))


def _trace_impl(graphdef, policy, n_steps, params, tokens, lengths, dec_tokens, cache):
    model = nnx.merge(graphdef, params)
    logits0, cache = forward.prefill(model, tokens, lengths, cache, policy)
    active = jnp.ones(tokens.shape[:1], bool)
    snap0 = snapshot(cache)

    def step(cache, tok):
        logits, cache, wrote = forward.decode_step(model, cache, tok, active, policy)
        return cache, (logits, wrote, snapshot(cache))

    if n_steps == 0:
        return logits0, None, None, snap0, None
    cache, (logits, wrote, snaps) = jax.lax.scan(step, cache, jnp.swapaxes(dec_tokens, 0, 1))
    return logits0, logits, wrote, snap0, snaps


# The tests compile one trace per (policy, shapes); XLA's optimisation level barely matters for
# models this small, and level 0 halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_trace_jit = jax.jit(_trace_impl, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)


def run_trace(policy: CachePolicy, tokens, lengths, dec_tokens, *, jit: bool = True, model=None):
    """Prefill of right-padded `tokens` i32[B, S] (lengths i32[B]) then one decode step per column
    of `dec_tokens` i32[B, n] (teacher-fed). Returns numpy: logits0 [B, V], logits [n, B, V],
    wrote [n, B], snap0 (after prefill) and snaps (stacked over steps, leading axis n)."""
    cfg, _, graphdef, params = model or tiny_model()
    tokens, lengths, dec_tokens = (jnp.asarray(np.asarray(x), jnp.int32) for x in (tokens, lengths, dec_tokens))
    b, s = tokens.shape
    n = dec_tokens.shape[1]
    caps = tuple(policy.capacity_for(i, s, n) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, b, caps, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                              dtype=jnp.float32)
    if jit:
        out = _trace_jit(graphdef, policy, n, params, tokens, lengths, dec_tokens, cache)
    else:
        with jax.disable_jit():
            out = _trace_impl(graphdef, policy, n, params, tokens, lengths, dec_tokens, cache)
    return jax.tree_util.tree_map(np.asarray, out)


def _uncached_kv_impl(graphdef, params, tokens, lengths):
    """Per layer: keys after RoPE, keys before RoPE, values [B, S, Hkv, D] and queries after RoPE
    [B, S, H, D] of an uncached forward."""
    model = nnx.merge(graphdef, params)
    pos = forward.prompt_positions(tokens, lengths)
    p0 = jnp.maximum(pos, 0)
    inv_freq = model.inv_freq()
    x = model.embed(tokens)
    ks, ks_raw, vs, qs = [], [], [], []
    for layer in model.layers:
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, p0, inv_freq)
        _, k_raw, _ = layer.self_attn.qkv(h, p0, inv_freq, rope=False)
        out, _ = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=model.config.sliding_window,
                                          causal_prefix=True)
        ks.append(k), ks_raw.append(k_raw), vs.append(v), qs.append(q)
        x = x + layer.self_attn.out(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return ks, ks_raw, vs, qs


_uncached_kv_jit = jax.jit(_uncached_kv_impl, static_argnums=0, compiler_options=FAST_COMPILE)


def uncached_kv(tokens, lengths, dec_tokens, *, model=None):
    """(keys, raw keys, values, queries) of the uncached forward over each row's prompt followed by
    its fed decode tokens: numpy lists per layer of [B, S + n, Hkv (or H), D]."""
    _, _, graphdef, params = model or tiny_model()
    tokens, lengths, dec_tokens = np.asarray(tokens), np.asarray(lengths), np.asarray(dec_tokens)
    b, s = tokens.shape
    n = dec_tokens.shape[1]
    seq = np.zeros((b, s + n), np.int32)
    for i in range(b):
        seq[i, : lengths[i]] = tokens[i, : lengths[i]]
        seq[i, lengths[i]: lengths[i] + n] = dec_tokens[i]
    out = _uncached_kv_jit(graphdef, params, jnp.asarray(seq), jnp.asarray(lengths + n, jnp.int32))
    return jax.tree_util.tree_map(np.asarray, out)


def step_snapshot(snaps, t):
    """The snapshot after decode step t from the stacked per-step snapshots."""
    return jax.tree_util.tree_map(lambda x: x[t], snaps)


def resident_sets(snap, layer: int, b: int, h: int) -> list[int]:
    p = snap["pos"][layer][b, h]
    return sorted(int(x) for x in p[p >= 0])


# ----------------------------------------------------------------------------- tiny model traces


@functools.lru_cache(maxsize=None)
def tiny_pikv(seed: int):
    """(config, PiKVModel) of the tiny test config, one per seed."""
    cfg = tiny_config()
    return cfg, PiKVModel.from_config(cfg, seed=seed)


def _model_trace_impl(graphdef, policy, caps, params, tokens, lengths, dec_tokens):
    """Prefill then teacher-fed decode steps -> (logits0, logits [n, B, V], wrote, cache after prefill,
    final cache)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    cache = init_policy_cache(policy, tokens.shape[0], caps, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=jnp.float32)
    logits0, cache = forward.prefill(model, tokens, lengths, cache, policy)
    active = jnp.ones(tokens.shape[:1], bool)

    def step(c, tok):
        logits, c, wrote = forward.decode_step(model, c, tok, active, policy)
        return c, (logits, wrote)

    final, (logits, wrote) = jax.lax.scan(step, cache, dec_tokens.T)
    return logits0, logits, wrote, cache, final


# XLA's optimisation level barely matters for a model this small; level 0 compiles much faster
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_model_trace = jax.jit(_model_trace_impl, static_argnums=(0, 1, 2), compiler_options=_FAST_COMPILE)


def model_trace(policy, tokens, lengths, dec, *, seed: int):
    """`_model_trace_impl` on the tiny PiKVModel of `seed`, as numpy (cheap element access in checks)."""
    cfg, m = tiny_pikv(seed)
    caps = tuple(policy.capacity_for(i, tokens.shape[1], dec.shape[1]) for i in range(cfg.num_hidden_layers))
    out = _model_trace(m.graphdef, policy, caps, m.params, jnp.asarray(tokens), jnp.asarray(lengths),
                       jnp.asarray(dec))
    return jax.tree_util.tree_map(np.asarray, out)
