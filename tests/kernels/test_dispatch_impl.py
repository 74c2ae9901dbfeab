"""The implementation switch (`impl` = xla | pallas | auto): resolution per platform and setting,
logged fallback under auto, clear errors when pallas is forced, and generation through the
dispatcher giving the same results with either implementation (kernels interpreted on CPU)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_helpers import assert_close, decode_case

from pikv_jax.api import PiKVModel
from pikv_jax.attention import dispatch
from pikv_jax.cache.policies import init_policy_cache, make_policy
from pikv_jax.cache.policies.quest import Quest
from pikv_jax.cache.state import LayerCache
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.config import tiny_config
from pikv_jax.kernels import common
from pikv_jax.runtime import forward


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv(common.ENV_IMPL, raising=False)
    monkeypatch.delenv(common.ENV_PALLAS_GPU, raising=False)
    common.set_attention_impl(None)
    yield
    common.set_attention_impl(None)


def test_resolution(monkeypatch):
    assert common.platform() == "cpu"
    assert common.resolve_impl() == "xla"  # auto on CPU
    assert common.resolve_impl("pallas") == "pallas"
    monkeypatch.setenv(common.ENV_IMPL, "pallas")
    assert common.resolve_impl() == "pallas"
    common.set_attention_impl("xla")  # the module setting wins over the environment
    assert common.resolve_impl() == "xla"
    with pytest.raises(ValueError, match="impl='cuda'"):
        common.set_attention_impl("cuda")
    common.set_attention_impl("auto")
    monkeypatch.setattr(common, "platform", lambda: "gpu")
    assert common.resolve_impl() == "xla"  # GPU kernels are opt-in until measured on a device
    monkeypatch.setenv(common.ENV_PALLAS_GPU, "1")
    assert common.resolve_impl() == "pallas"
    monkeypatch.setattr(common, "platform", lambda: "tpu")
    assert common.resolve_impl() == "pallas" and common.default_backend() == "mosaic_tpu"


def test_auto_falls_back_with_a_logged_reason(monkeypatch, caplog):
    """On TPU, auto picks Pallas; a float16 cache is unsupported there: XLA runs and says why."""
    monkeypatch.setattr(common, "platform", lambda: "tpu")
    common._logged.clear()
    q, k, v, pos, q_pos = decode_case(2, 2, 4, 2, 30, 16, jnp.float16)
    cache = LayerCache(k=k, v=v, pos=pos, score=jnp.zeros(pos.shape))
    with caplog.at_level(logging.WARNING, logger="pikv_jax.kernels"):
        out, mass = jax.jit(dispatch.decode_attention)(q, cache, q_pos)
    assert "falling back to XLA" in caplog.text and "float16" in caplog.text
    ref = dispatch.reference.decode_attention(q, k, v, pos, q_pos)
    assert np.array_equal(np.asarray(out), np.asarray(ref[0]))


def test_forced_pallas_raises_on_unsupported():
    q, k, v, pos, q_pos = decode_case(3, 1, 4, 2, 30, 24, jnp.float32)
    cache = LayerCache(k=k, v=v, pos=pos, score=jnp.zeros(pos.shape))
    with pytest.raises(common.KernelUnsupported, match="head_dim 24"):
        dispatch.decode_attention(q, cache, q_pos, impl="pallas")


def test_dispatch_pallas_equals_xla():
    q, k, v, pos, q_pos = decode_case(4, 3, 8, 2, 70, 32, jnp.float32)
    cache = LayerCache(k=k, v=v, pos=pos, score=jnp.zeros(pos.shape))
    got = jax.jit(lambda *a: dispatch.decode_attention(*a, group_reduce="max", impl="pallas"))(q, cache, q_pos)
    want = jax.jit(lambda *a: dispatch.decode_attention(*a, group_reduce="max", impl="xla"))(q, cache, q_pos)
    assert_close(got[0], want[0], 2e-5, "out")
    assert_close(got[1], want[1], 2e-6, "mass")


def test_kivi_flush_bit_identical_through_dispatcher():
    policy = QuantizedPolicy(bits=4, group_size=16, residual_length=32)
    cache = policy.init_layer_cache(0, 2, 2, 64, 32, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    cache = cache.replace(k_res=jax.random.normal(keys[0], cache.k_res.shape),
                          v_res=jax.random.normal(keys[1], cache.v_res.shape),
                          pos=cache.pos.at[:, :, cache.quantized_slots:].set(jnp.arange(32)),
                          ring_count=jnp.full((2, 2), 32, jnp.int32))
    flush, target = jnp.array([[True, False], [True, True]]), jnp.array([[0, 1], [1, 0]], jnp.int32)
    common.set_attention_impl("pallas")
    got = jax.jit(policy._flush)(cache, flush, target)
    common.set_attention_impl("xla")
    want = jax.jit(policy._flush)(cache, flush, target)  # a new trace: jit keys on the function object
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _generate(policy, impl, steps=3):
    """Prefill + `steps` greedy decode steps of a tiny random Llama (head_dim 16) under `impl`;
    a fresh closure per call, so the implementation setting is traced anew."""
    cfg = tiny_config("llama")
    model = PiKVModel.from_config(cfg, seed=3)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 24)), jnp.int32)
    lengths = jnp.array([24, 17], jnp.int32)
    caps = tuple(policy.capacity_for(i, 24, steps) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, 2, caps, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                              dtype=jnp.float32)

    def run(params, tokens, lengths, cache):
        m = nnx.merge(model.graphdef, params)
        logits, cache = forward.prefill(m, tokens, lengths, cache, policy)
        out = [logits]
        for _ in range(steps):
            tok = jnp.argmax(out[-1], axis=-1).astype(jnp.int32)
            logits, cache, _ = forward.decode_step(m, cache, tok, jnp.ones((2,), bool), policy)
            out.append(logits)
        return jnp.stack(out, 1), cache

    common.set_attention_impl(impl)
    try:
        return jax.jit(run)(model.params, tokens, lengths, cache)
    finally:
        common.set_attention_impl(None)


def _compare(policy):
    got_logits, got_cache = _generate(policy, "pallas")
    want_logits, want_cache = _generate(policy, "xla")
    assert_close(got_logits, want_logits, 1e-4, "logits")
    for a, b in zip(got_cache.layers, want_cache.layers):
        assert np.array_equal(np.asarray(a.pos), np.asarray(b.pos))  # same tokens kept / evicted
        assert_close(a.score, b.score, 1e-5, "scores")


def test_generation_h2o_same_with_either_impl():
    _compare(make_policy("h2o", budget_tokens=16, n_sink=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kivi", "quest"])
def test_generation_kivi_and_quest_same_with_either_impl(name):
    if name == "kivi":
        policy = QuantizedPolicy(bits=4, group_size=16, residual_length=16,
                                 inner=make_policy("h2o", budget_tokens=20, n_sink=2))
    else:
        policy = Quest(page_size=4, token_budget=8, dense_layers=1)
    _compare(policy)
