"""Each architecture's distinguishing parts against the independent NumPy model
(tests/numpy_reference.py): Qwen2's q/k/v bias, Qwen3's q/k RMSNorm, Mistral's sliding window,
tied heads, head_dim != hidden/heads, Llama-3 and linear RoPE scaling, grouped-query attention.

Weights are random and non-trivial (biases and norm weights far from 0 and 1), and for every
variant the test also shows that dropping its distinguishing part changes the reference logits,
so agreement cannot come from the part being a no-op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from flax import nnx

from pikv_jax.attention.rope import rope_inv_freq
from pikv_jax.config import RopeScaling, tiny_config
from pikv_jax.models.weights import build_model
from pikv_jax.runtime import forward

LENGTHS = (13, 9)

VARIANTS = {
    # name: (config, how the HF config looks without the distinguishing part)
    "llama_gqa": (tiny_config("llama"), lambda c: dict(c, num_key_value_heads=None)),
    "qwen2_bias": (tiny_config("qwen2"), lambda c: dict(c, model_type="llama", attention_bias=False)),
    "qwen3_qk_norm": (tiny_config("qwen3", head_dim=24), lambda c: dict(c, model_type="llama")),
    "mistral_window": (tiny_config("mistral", sliding_window=5), lambda c: dict(c, sliding_window=None)),
    "llama3_rope_tied": (
        tiny_config("llama", tie_word_embeddings=True, rope_theta=10000.0,
                    rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64)),
        lambda c: dict(c, rope_scaling=None)),
    "llama_attention_bias": (tiny_config("llama", attention_bias=True),
                             lambda c: dict(c, attention_bias=False)),
    "linear_rope": (tiny_config("llama", rope_scaling=RopeScaling(rope_type="linear", factor=4.0)),
                    lambda c: dict(c, rope_scaling=None)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_numpy_reference(name):
    cfg, without = VARIANTS[name]
    hf_cfg = cfg.to_hf_dict()
    weights = numpy_reference.random_weights(hf_cfg, seed=sum(map(ord, name)))
    graphdef, params = nnx.split(build_model(cfg, weights))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, max(LENGTHS))).astype(np.int32)
    lengths = np.array(LENGTHS, np.int32)
    run = jax.jit(lambda p, t, l: forward.forward_full(nnx.merge(graphdef, p), t, l))
    logits = np.asarray(run(params, jnp.asarray(tokens), jnp.asarray(lengths)))
    for b, n in enumerate(LENGTHS):
        ref = numpy_reference.forward(hf_cfg, weights, tokens[b, :n])
        scale = np.abs(ref).max()
        np.testing.assert_allclose(logits[b, :n], ref, atol=1e-5 * max(scale, 1.0), rtol=0, err_msg=f"{name} row {b}")
        # the part under test matters for these weights and lengths
        if name == "llama_gqa":  # every query head reading KV head 0 instead of its own group's
            ref_other = numpy_reference.forward(dict(hf_cfg, num_key_value_heads=1),
                                                {k: (v[: v.shape[0] // 2] if ("k_proj" in k or "v_proj" in k)
                                                     else v) for k, v in weights.items()}, tokens[b, :n])
        else:
            ref_other = numpy_reference.forward(without(hf_cfg), weights, tokens[b, :n])
        assert np.abs(ref_other - ref).max() > 1e-2 * max(scale, 1.0), f"{name}: the variant's part is a no-op here"


def test_llama3_rope_inv_freq_matches_an_independent_loop():
    """Llama-3.1-8B's settings: factor 8, low 1, high 4, original context 8192, theta 500000, D=128."""
    scaling = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    got = np.asarray(rope_inv_freq(128, 500000.0, scaling), np.float64)
    want = numpy_reference.llama3_inv_freq_loop(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ratio = want / base
    # all three regimes occur: kept (high frequencies), divided by 8 (low), interpolated (between)
    assert np.sum(np.isclose(ratio, 1.0)) > 10 and np.sum(np.isclose(ratio, 1 / 8)) > 10
    assert np.sum((ratio < 0.99) & (ratio > 0.126)) >= 3


def test_default_and_linear_rope_inv_freq():
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(64, 10000.0, None)), base, rtol=2e-6)
    linear = RopeScaling(rope_type="linear", factor=4.0)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(64, 10000.0, linear)), base / 4, rtol=2e-6)
