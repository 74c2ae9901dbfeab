"""expert_kv(router=moe): KV placed by the layer's MoE gate (pikv_jax/cache/policies/expert_kv.py) on a
tiny random MoE model (4 experts, top-2).

- exact mode (all shards, room for every token) gives the full cache's greedy ids;
- with room everywhere, every prompt token of layer 0 sits in the shard of the gate's argmax expert,
  the gate recomputed here from the embedding and layer 0's input norm (every KV head alike);
- routed top-1 sends the decode query to the shard its own gate ranks first;
- with 4 experts in 2 shards, a shard scores its best expert (expert e -> shard e // 2);
- a dense model or experts that the shards do not divide give one-line errors.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies import CachePolicy, ExpertKV, init_policy_cache
from pikv_jax.cache.policies.expert_kv import gate_ranking
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method
from pikv_jax.runtime import forward


@pytest.fixture(scope="module")
def moe_model():
    cfg = tiny_config("mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=97)
    return PiKVModel.from_config(cfg, seed=0)


def prompts(vocab=97):
    rng = np.random.default_rng(3)
    return [rng.integers(3, vocab, n).tolist() for n in (30, 19)]


def test_exact_moe_routed_equals_the_full_cache(moe_model):
    full = moe_model.generate(prompts(), max_new_tokens=6, policy=CachePolicy(), stop_ids=())
    exact = moe_model.generate(prompts(), max_new_tokens=6, stop_ids=(),
                               policy=parse_method("expert_kv(shards=4,router=moe)", model=moe_model).policy)
    assert exact.token_ids == full.token_ids
    assert exact.stats["evicted_tokens"] == 0 and sum(exact.stats["shard_tokens"]) > 0


def test_prompt_tokens_sit_in_the_shard_of_the_gates_argmax_expert(moe_model):
    policy = moe_model.bind_policy(ExpertKV(shards=4, top_k=1, router="moe"))
    assert policy.num_experts == 4
    cfg, model = moe_model.config, moe_model.model
    tokens, lengths = moe_model.pad_prompt_batch(prompts())
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    s = tokens.shape[1]
    cache = init_policy_cache(policy, 2, (4 * s,) * cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=jnp.float32)  # room for every token in any shard
    _, cache = forward.prefill(model, tokens, lengths, cache, policy)
    layer0 = model.layers[0]
    gate = np.asarray(layer0.mlp.router.gate(layer0.input_layernorm(model.embed(tokens))))  # [B, S, E]
    pos = np.asarray(cache.layers[0].pos)  # [B, Hkv, C]
    shard_of_slot = np.arange(pos.shape[-1]) // s
    for b in range(2):
        for h in range(cfg.num_key_value_heads):
            held = pos[b, h] >= 0
            assert held.sum() == int(lengths[b])
            np.testing.assert_array_equal(shard_of_slot[held], np.argmax(gate[b, pos[b, h][held]], axis=-1))


def test_routed_query_goes_to_its_own_gates_first_shard(moe_model):
    policy = moe_model.bind_policy(ExpertKV(shards=4, top_k=1, router="moe"))
    cache = policy.init_layer_cache(0, 2, 2, 8, 4, jnp.float32)
    gate = jnp.asarray([[0.1, 2.0, -1.0, 0.3], [0.0, -1.0, 0.5, 0.4]], jnp.float32)
    cache = cache.replace(extra=dict(cache.extra, gate=gate, load=jnp.ones((2, 2, 4), jnp.int32)))
    chosen = np.asarray(policy.select_shards(cache, jnp.zeros((2, 4, 4))))
    np.testing.assert_array_equal(chosen[..., 0], [[1, 1], [2, 2]])


def test_experts_grouped_evenly_into_shards():
    logits = jnp.asarray([[0.0, 0.1, 3.0, -2.0], [1.0, 0.2, 0.3, 0.9]])
    np.testing.assert_array_equal(np.asarray(gate_ranking(logits, 2)), [[1, 0], [0, 1]])


def test_bad_moe_router_settings_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"groups num_experts=6 evenly into shards=4") as e:
        ExpertKV(shards=4, router="moe", num_experts=6)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"router='hash' is not supported; allowed: kmeans, moe"):
        ExpertKV(router="hash")
    dense = PiKVModel.from_config(tiny_config(), seed=0)
    with pytest.raises(ValueError, match=r"needs num_experts"):
        dense.generate(prompts()[:1], max_new_tokens=2, policy=ExpertKV(router="moe"))
