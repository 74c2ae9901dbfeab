"""KV-cache pytree bookkeeping: bytes actually allocated, the bf16 full-cache denominator, and the
measured statistics `PiKVModel.get_stats()` reports after a generation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.cache.state import KVCache, full_bf16_bytes, init_cache


@pytest.mark.parametrize("dtype,itemsize", [(jnp.float32, 4), (jnp.bfloat16, 2)])
def test_nbytes_is_the_sum_of_allocated_arrays(dtype, itemsize):
    b, hk, d = 3, 2, 8
    caps = (16, 12, 8)  # per-layer capacities (pyramid-style budgets)
    cache = init_cache(b, caps, num_layers=3, num_kv_heads=hk, head_dim=d, dtype=dtype)
    leaves = jax.tree_util.tree_leaves(cache)
    assert cache.nbytes() == sum(x.nbytes for x in leaves)
    # by hand: K and V in the cache dtype, i32 positions and f32 scores per slot, i32 lengths per row
    by_hand = sum(2 * b * hk * c * d * itemsize + b * hk * c * (4 + 4) for c in caps) + b * 4
    assert cache.nbytes() == by_hand
    assert sum(layer.nbytes() for layer in cache.layers) + cache.length.nbytes == by_hand
    assert cache.capacities() == caps
    # it is a pytree: the byte count survives tree operations and jit round trips
    same = jax.jit(lambda c: c)(cache)
    assert isinstance(same, KVCache) and same.nbytes() == by_hand


def test_full_bf16_bytes_by_hand():
    # 2 rows of 5 and 7 tokens, 4 layers, 3 KV heads, head_dim 16: K and V, 2 bytes each
    assert full_bf16_bytes(np.array([5, 7]), num_layers=4, num_kv_heads=3, head_dim=16) == 12 * 4 * 3 * 16 * 2 * 2
    assert full_bf16_bytes(10, num_layers=1, num_kv_heads=1, head_dim=2) == 80
    # the same as the nbytes of bf16 K and V arrays holding exactly those tokens
    kv = jnp.zeros((2, 4, 12, 3, 16), jnp.bfloat16)  # (K/V, layers, tokens, heads, dim)
    assert full_bf16_bytes(np.array([5, 7]), num_layers=4, num_kv_heads=3, head_dim=16) == kv.nbytes


def test_stats_after_generation(tiny_lm):
    model, prompts = tiny_lm
    n_new = 8
    out = model.generate(prompts, n_new, stop_ids=())  # the shapes of test_generate's greedy run
    stats = model.get_stats()
    assert stats == out.stats
    cfg = model.config
    b, layers, hk, d = len(prompts), cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head
    capacity = 64 + n_new  # prompts padded to 64, plus room for the generated tokens (Full cache, f32)
    assert stats["cache_capacity_tokens"] == capacity
    assert stats["cache_bytes"] == layers * (2 * b * hk * capacity * d * 4 + b * hk * capacity * 8) + b * 4
    # every generated token but the last was fed back and cached
    cached = [len(p) + n_new - 1 for p in prompts]
    assert stats["full_cache_bytes"] == sum(cached) * layers * hk * d * 2 * 2
    assert stats["seen_tokens"] == sum(cached)
    assert math.isclose(stats["cache_fill"], sum(cached) / (b * capacity), rel_tol=1e-6)
    assert 0.0 < stats["cache_fill"] <= 1.0
    assert stats["prefill_tokens_per_s"] > 0 and math.isfinite(stats["prefill_tokens_per_s"])
    assert stats["decode_ms_per_token"] > 0 and math.isfinite(stats["decode_ms_per_token"])
    assert stats["decode_steps"] == n_new - 1  # the first token comes from prefill
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["generated_tokens"] == b * n_new


def test_get_stats_before_generation_is_empty(tiny_lm):
    from pikv_jax.api import PiKVModel

    model, _ = tiny_lm
    assert PiKVModel(model.model, None, model.config).get_stats() == {}
