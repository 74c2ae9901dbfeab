"""Shared helpers of tests/compress: a tiny random Llama and one jitted trace (prefill, then teacher-fed
decode steps under a policy) that returns the caches the tests inspect, plus the uncached keys/values
of every position (the truth a compressed cache approximates)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
from flax import nnx

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies.base import PrefillContext, init_policy_cache
from pikv_jax.config import tiny_config
from pikv_jax.models.weights import build_model
from pikv_jax.runtime import forward
from pikv_jax.runtime.capture import capture_qkv


@functools.lru_cache(maxsize=None)
def tiny_model(num_layers: int = 2, seed: int = 7) -> PiKVModel:
    """A PiKVModel over a tiny random Llama: 4 query / 2 KV heads, head dim 16, vocab 97."""
    cfg = tiny_config("llama", num_hidden_layers=num_layers, max_position_embeddings=1024)
    return PiKVModel(build_model(cfg, numpy_reference.random_weights(cfg.to_hf_dict(), seed=seed)), None, cfg)


def random_prompts(lengths, seed: int = 0, vocab: int = 97):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def pad(prompts, width=None):
    width = width or max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


# Tests compile at XLA's lowest backend optimisation level: about half the compile time of the default
# on the shared CPU, and every comparison here is between runs of this same function (or against
# tolerances far above float32 reassociation).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _trace(graphdef, policy, params, tokens, lengths, cache, fed):
    model = nnx.merge(graphdef, params)
    logits0, cache = forward.prefill(model, tokens, lengths, cache, policy)
    after_prefill = cache
    active = jnp.ones(tokens.shape[:1], bool)

    def step(cache, tok):
        logits, cache, wrote = forward.decode_step(model, cache, tok, active, policy)
        return cache, (logits, tuple(layer.head_positions() for layer in cache.layers), wrote)

    cache, (logits, pos_hist, wrote) = jax.lax.scan(step, cache, jnp.swapaxes(fed, 0, 1))
    return logits0, after_prefill, cache, logits, pos_hist, wrote


def run_trace(model: PiKVModel, policy, prompts, fed, *, cache_dtype=jnp.float32):
    """Prefill `prompts` then feed `fed` (i32[B, T], one token per row per step).

    Returns dict(prefill_logits [B, V], prefill_cache, cache (final), logits [T, B, V], pos_hist: per
    layer i32[T, B, Hkv, C] resident positions after each step, wrote bool[T, B])."""
    tokens, lengths = pad(prompts)
    fed = jnp.asarray(fed, jnp.int32)
    cfg = model.config
    caps = tuple(policy.capacity_for(i, tokens.shape[1], fed.shape[1]) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, len(prompts), caps, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=cache_dtype)
    out = _trace(model.graphdef, policy, model.params, tokens, lengths, cache, fed)
    return dict(zip(("prefill_logits", "prefill_cache", "cache", "logits", "pos_hist", "wrote"), out))


def true_kv(model: PiKVModel, prompts, fed):
    """Uncached keys (after RoPE) and values of every position of prompt + fed tokens, per layer:
    list of (k [B, Hkv, S, D], v) numpy, position p of row b at index p."""
    seqs = [list(p) + [int(t) for t in f] for p, f in zip(prompts, np.asarray(fed))]
    return [(x.k, x.v) for x in capture_qkv(model, seqs, max_tokens=10**6)]


def prefill_contexts(model: PiKVModel, prompts):
    """One PrefillContext per layer from the model's own prefill tensors (all sharing one `shared`
    dict, as in forward.prefill), for eager policy.prefill calls that need no compilation."""
    shared: dict = {}
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    return [PrefillContext(q=jnp.asarray(x.q), k=jnp.swapaxes(jnp.asarray(x.k), 1, 2),
                           v=jnp.swapaxes(jnp.asarray(x.v), 1, 2), pos=jnp.asarray(x.pos), lengths=lengths,
                           key_mass=None, shared=shared) for x in capture_qkv(model, prompts)]


def prefill_eager(policy, contexts, dtype=jnp.float32):
    """policy.prefill of every layer, eagerly, into caches sized by the policy -> list of layer caches."""
    out = []
    for layer, ctx in enumerate(contexts):
        b, s, hk, d = ctx.k.shape
        cache = policy.init_layer_cache(layer, b, hk, policy.layer_budget(layer, s), d, dtype)
        out.append(policy.prefill(layer, cache, ctx))
    return out
