"""The jaxtyping annotations of the cache pytrees and cache operations are enforced under test.

tests/conftest.py installs jaxtyping's import hook (beartype as the checker) over the modules in
its `TYPECHECKED` before they are imported; these tests prove that the hook is active: a
mismatched shape raises, a consistent one passes, inside and outside jit and under eval_shape.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from pikv_jax.cache import ops
from pikv_jax.cache.pooled import PooledLayerCache, init_pooled_cache
from pikv_jax.cache.quantized import init_quantized_layer
from pikv_jax.cache.state import KVCache, LayerCache, init_cache, init_layer_cache

pytestmark = pytest.mark.skipif(os.environ.get("PIKV_TYPECHECK", "1") == "0",
                                reason="shape checks switched off (PIKV_TYPECHECK=0)")

B, HK, C, D = 2, 3, 5, 4


def _layer(**over):
    fields = dict(k=jnp.zeros((B, HK, C, D)), v=jnp.zeros((B, HK, C, D)), pos=jnp.full((B, HK, C), -1, jnp.int32),
                  score=jnp.zeros((B, HK, C)))
    return LayerCache(**(fields | over))


def test_hook_covers_the_cache_modules():
    for fn in (LayerCache.__init__, KVCache.__init__, ops.write_token, init_layer_cache):
        assert hasattr(fn, "__wrapped__"), fn  # the jaxtyped wrapper


def test_layer_cache_accepts_consistent_shapes():
    cache = _layer()
    assert cache.capacity == C and cache.head_dim == D


@pytest.mark.parametrize("bad", [
    dict(pos=jnp.full((B, HK, C + 1), -1, jnp.int32)),  # pos has another capacity than k
    dict(score=jnp.zeros((B, HK + 1, C))),  # score has another head count
    dict(k=jnp.zeros((B, HK, C))),  # k lacks the head dimension
    dict(v=jnp.zeros((B, HK, C, D + 1))),  # v's head dim differs from k's
    dict(pos=jnp.full((B, HK, C), -1, jnp.float32)),  # positions are int32
], ids=["pos-capacity", "score-heads", "k-rank", "v-head-dim", "pos-dtype"])
def test_layer_cache_rejects_inconsistent_fields(bad):
    with pytest.raises(TypeCheckError):
        _layer(**bad)


def test_replace_is_checked_too():
    with pytest.raises(TypeCheckError):
        _layer().replace(pos=jnp.zeros((B, HK), jnp.int32))


def test_checks_run_under_jit_tracing():
    @jax.jit
    def bad(cache):
        return cache.replace(score=jnp.zeros((B, HK, C + 2)))

    with pytest.raises(TypeCheckError):
        bad(_layer())
    ok = jax.jit(lambda c: c.replace(score=c.score + 1.0))(_layer())
    assert float(ok.score[0, 0, 0]) == 1.0


def test_pytrees_rebuilt_with_non_array_leaves_are_not_checked():
    """jax rebuilds caches from ShapeDtypeStructs (eval_shape), numpy arrays (device_get) and None;
    only construction through __init__ is checked."""
    abstract = jax.eval_shape(lambda: init_cache(B, (C, C + 1), num_layers=2, num_kv_heads=HK, head_dim=D))
    assert isinstance(abstract.layers[1].pos, jax.ShapeDtypeStruct) and abstract.capacities() == (C, C + 1)
    host = jax.device_get(init_cache(B, C, num_layers=1, num_kv_heads=HK, head_dim=D))
    assert isinstance(host.layers[0].k, np.ndarray)
    assert jax.tree.map(lambda x: None, _layer()).k is None
    q = jax.eval_shape(lambda: init_quantized_layer(B, HK, 40, 32, jnp.bfloat16, bits=4, group_size=16,
                                                    residual_length=8, scale_dtype=jnp.float32))
    assert q.pos.shape == (B, HK, 40)
    assert jax.eval_shape(lambda: init_pooled_cache(B, HK, 7, D, jnp.float32)).pos.shape == (B, 7)


def test_kv_cache_length_is_checked():
    with pytest.raises(TypeCheckError):
        KVCache(layers=(_layer(),), length=jnp.zeros((B, 1), jnp.int32))


def test_pooled_cache_fields_are_checked():
    cache = init_pooled_cache(B, HK, 7, D, jnp.float32)
    with pytest.raises(TypeCheckError):
        cache.replace(head=jnp.zeros((B, 6), jnp.int32))
    assert isinstance(cache, PooledLayerCache)


def test_quantized_cache_relates_slots_to_codes_and_ring():
    cache = init_quantized_layer(B, HK, 40, 32, jnp.float32, bits=4, group_size=16, residual_length=8,
                                 scale_dtype=jnp.float32)
    assert cache.pos.shape[-1] == cache.quantized_slots + cache.residual_slots
    with pytest.raises(TypeCheckError):  # pos must have Cq + R slots
        cache.replace(pos=cache.pos[..., :-1])


def test_write_token_checks_its_arguments():
    cache = _layer()
    k = jnp.ones((B, HK, D))
    slot, free = ops.first_free_slot(cache.pos)
    out = ops.write_token(cache, k, k, jnp.array([0, 1], jnp.int32), slot, free.all(-1))
    assert out.pos.shape == (B, HK, C)
    with pytest.raises(TypeCheckError):  # a key per query head row, not per KV head: [B, HK + 1, D]
        ops.write_token(cache, jnp.ones((B, HK + 1, D)), jnp.ones((B, HK + 1, D)), jnp.array([0, 1], jnp.int32),
                        slot, free.all(-1))
    with pytest.raises(TypeCheckError):  # v's head dimension differs from k's
        ops.write_token(cache, k, jnp.ones((B, HK, D + 1)), jnp.array([0, 1], jnp.int32), slot, free.all(-1))
    with pytest.raises(TypeCheckError):  # active must be bool[B]
        ops.write_token(cache, k, k, jnp.array([0, 1], jnp.int32), slot, jnp.ones((B,), jnp.int32))


def test_write_prompt_relates_prompt_shapes():
    cache = init_layer_cache(B, HK, C, D, jnp.float32)
    k = jnp.ones((B, 4, HK, D))
    pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (B, 4))
    assert ops.write_prompt(cache, k, k, pos).pos.shape == (B, HK, C)
    with pytest.raises(TypeCheckError):  # pos has another prompt length than k
        ops.write_prompt(cache, k, k, pos[:, :3])
    with pytest.raises(TypeCheckError):  # prompt keys with [B, S, D] (no head axis)
        ops.write_prompt(cache, k[:, :, 0], k[:, :, 0], pos)
