"""PiKVCompressor: method choice per layer from measured importance, the per-layer policy in generation
(layers really differ in layout and bytes), seed-style standalone choice, stats and errors."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from compress_helpers import prefill_contexts, prefill_eager, random_prompts, run_trace, tiny_model

from pikv_jax.cache.policies import H2O, CachePolicy, SnapKV
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.compress.fastv import FastVPolicy
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.compress.pikv import PerLayerPolicy, PiKVCompressor, assign_methods, depth_prior
from pikv_jax.compress.quantized import QuantizedKV
from pikv_jax.compress.selection import SelectedKV

LENGTHS, STEPS = (30, 45), 40
GENTLE, AGGRESSIVE = "int8:8:16", "int2:8:16"


def test_assignment_rules():
    imp = [1.0, 0.6, 0.4, 0.1, 0.0]
    assert assign_methods(imp, 2, 0.5, True) == [0, 0, 1, 1, 1]
    assert assign_methods(imp, 3, 0.5, True) == [0, 0, 1, 2, 2]
    assert assign_methods(imp, 2, 0.5, False) == [0, 0, 0, 1, 1]  # contiguous blocks
    assert assign_methods(imp, 1, 0.5, True) == [0] * 5
    assert depth_prior(3) == [1.0, 0.5, 0.0]
    c = PiKVCompressor(compression_methods=[GENTLE, AGGRESSIVE], num_layers=4)
    assert c.assignment() == [GENTLE, GENTLE, AGGRESSIVE, AGGRESSIVE]  # depth prior without calibration


def test_standalone_choice_follows_importance_and_stats_count_methods():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 40, 16)), jnp.float32)
    c = PiKVCompressor(compression_methods=[GENTLE, AGGRESSIVE], importance_threshold=0.5)
    hi, lo = c(x, x, importance=jnp.full((1, 40), 0.9)), c(x, x, importance=jnp.full((1, 40), 0.1))
    none = c(x, x)
    assert isinstance(hi, QuantizedKV) and hi.bits == 8 and lo.bits == 2 and none.bits == 8
    s = c.get_compression_stats()
    assert s["method_usage"] == {GENTLE: 2, AGGRESSIVE: 1}
    assert s["stored_bytes"] == hi.nbytes() + lo.nbytes() + none.nbytes()
    assert s["compression_ratio_vs_bf16"] == pytest.approx(3 * 2 * 2 * x.size / s["stored_bytes"])
    assert s["compression_ratio"] == pytest.approx(3 * 2 * 4 * x.size / s["stored_bytes"])  # float32 input


def test_seed_default_methods_on_the_seed_layout():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 80, 24)), jnp.float32)  # [B, S, hidden]
    c = PiKVCompressor(24)  # seed defaults: lora (gentle), pyramid (aggressive)
    assert c.method_names == ["lora", "pyramid"]
    assert c(x, x, importance=jnp.ones((1, 80))).ck.shape == (1, 1, 80, 16)
    assert isinstance(c(x, x, importance=jnp.zeros((1, 80))), SelectedKV)


@functools.lru_cache(maxsize=None)
def calibrated():
    model = tiny_model()
    prompts = random_prompts(LENGTHS, seed=21)
    c = PiKVCompressor(compression_methods=[GENTLE, AGGRESSIVE], importance_threshold=1.0)
    return model, prompts, c.calibrate(model, prompts=prompts)


def test_calibration_measures_importance_and_picks_per_layer():
    model, prompts, c = calibrated()
    imp = c.layer_importance
    assert len(imp) == 2 and max(imp) == 1.0 and min(imp) >= 0.0
    methods = c.assignment()
    # threshold 1.0: only the most important layer keeps the gentle method
    assert methods == [GENTLE if i == 1.0 else AGGRESSIVE for i in imp]
    assert sorted(methods) == sorted([GENTLE, AGGRESSIVE])
    policy = c.as_policy(H2O(budget_tokens=40))
    assert isinstance(policy, PerLayerPolicy) and policy.methods == tuple(methods)
    assert all(isinstance(p, QuantizedPolicy) and p.inner == H2O(budget_tokens=40) for p in policy.policies)
    s = c.get_compression_stats()
    assert s["layer_methods"] == methods and s["layer_method_usage"] == {GENTLE: 1, AGGRESSIVE: 1}


def test_per_layer_policy_in_generation():
    model, prompts, c = calibrated()
    policy = c.as_policy()
    fed = np.random.default_rng(3).integers(3, 97, (2, STEPS))
    out = run_trace(model, policy, prompts, fed)
    bits = {GENTLE: 8, AGGRESSIVE: 2}
    for layer, m in zip(out["cache"].layers, policy.methods):
        assert isinstance(layer, QuantizedLayerCache) and layer.bits == bits[m]
    assert bool(np.all(out["wrote"])) and np.isfinite(np.asarray(out["logits"])).all()
    # measured bytes: what the per-layer caches allocate
    report = c.cache_bytes(model.config, 45, STEPS, batch=2, dtype=jnp.float32)
    assert report["total_bytes"] == out["cache"].nbytes() - out["cache"].length.nbytes
    assert report["layer_bytes"] == [layer.nbytes() for layer in out["cache"].layers]
    assert report["method_bytes"][AGGRESSIVE] < report["method_bytes"][GENTLE]


def test_fastv_layer_in_a_per_layer_policy_gets_its_ranking():
    model, prompts, _ = calibrated()
    # layer K = 0 uses int8; layer 1 uses FastV, which needs layer 0's ranking
    policy = PerLayerPolicy(policies=(QuantizedPolicy(bits=8, group_size=8, residual_length=16),
                                      FastVPolicy(layer=0, drop_ratio=0.5, n_sink=2, window=3)),
                            methods=("int8", "fastv"))
    caches = prefill_eager(policy, prefill_contexts(model, prompts))
    assert isinstance(caches[0], QuantizedLayerCache)
    np.testing.assert_array_equal(caches[1].resident_per_head(), [[15, 15], [23, 23]])
    assert policy.label == "pikv[int8x1,fastvx1]"


def test_errors():
    with pytest.raises(ValueError, match="compression_methods is empty"):
        PiKVCompressor(compression_methods=[])
    with pytest.raises(ValueError, match=r"importance_threshold must be in \[0, 1\]"):
        PiKVCompressor(compression_methods=["int8"], importance_threshold=2.0)
    with pytest.raises(ValueError, match="duplicates"):
        PiKVCompressor(compression_methods=["int8", "int8"])
    with pytest.raises(ValueError, match="unknown compressor"):
        PiKVCompressor(compression_methods=["int8", "zip"])
    with pytest.raises(ValueError, match="needs the model depth"):
        PiKVCompressor(compression_methods=["int8", "int4"]).as_policy()
    with pytest.raises(ValueError, match="group_reduce"):
        PerLayerPolicy(policies=(CachePolicy(), H2O(budget_ratio=0.5, group_reduce="max")))
    class WindowMass(CachePolicy):  # wants the mass of the last 4 prompt queries only
        def prefill_mass_from(self, lengths):
            return lengths - 4

    with pytest.raises(ValueError, match="attention mass"):
        PerLayerPolicy(policies=(H2O(budget_ratio=0.5), WindowMass()))
    with pytest.raises(ValueError, match="out of range"):
        PerLayerPolicy(policies=(SnapKV(budget_ratio=0.5),)).layer_budget(1, 10)
