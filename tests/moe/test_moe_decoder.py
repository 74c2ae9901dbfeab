"""The MoE decoder variant (Mixtral / Qwen2-MoE / Qwen3-MoE): configs, Hugging Face folders, cached
generation against the uncached forward, and the `pikv generate` MoE flags."""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.api import PiKVModel
from pikv_jax.cli.moe_args import add_moe_args, apply_moe_args, moe_overrides
from pikv_jax.config import PRESETS, ModelConfig
from pikv_jax.models.hf_loader import save_hf_folder
from pikv_jax.models.moe_llama import moe_aux_loss, moe_layers, moe_stats
from pikv_jax.models.weights import abstract_model, build_model, expected_hf_names, model_to_hf_weights
from pikv_jax.moe import PiKVMoE
from pikv_jax.runtime import forward

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def full_logits(model, seqs):
    """Uncached forward (jitted once per model structure) over right-padded token lists -> f32[B, S, V]."""
    graphdef, state = nnx.split(model)
    s = max(len(q) for q in seqs)
    toks = jnp.array([q + [0] * (s - len(q)) for q in seqs])
    lens = jnp.array([len(q) for q in seqs])
    return np.asarray(_jit_forward_full(graphdef, state, toks, lens))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward_full(graphdef, state, toks, lens):
    return forward.forward_full(nnx.merge(graphdef, state), toks, lens)


def _assert_greedy_matches_uncached(model: PiKVModel, prompts, generated):
    """Each generated token is the argmax of the uncached forward over prompt + generated prefix."""
    checked = 0
    all_logits = full_logits(model.model, [p + g for p, g in zip(prompts, generated)])
    for p, gen, logits in zip(prompts, generated, all_logits):
        for i, tok in enumerate(gen):
            row = logits[len(p) - 1 + i]
            top2 = np.sort(row)[-2:]
            if top2[1] - top2[0] < 1e-4:
                continue  # a numerical tie says nothing
            assert int(np.argmax(row)) == tok, f"step {i}: cached decode chose {tok}, uncached {np.argmax(row)}"
            checked += 1
    assert checked >= len(generated)


@pytest.fixture(scope="module")
def mixtral():
    return PiKVModel.from_pretrained("random:mixtral-tiny")


@pytest.mark.slow
def test_random_mixtral_generates_and_cached_decode_equals_uncached_forward(mixtral):
    assert all(isinstance(layer.mlp, PiKVMoE) for layer in mixtral.model.layers)
    out = mixtral.generate(PROMPTS, max_new_tokens=6, stop_ids=())
    assert [len(t) for t in out.token_ids] == [6, 6]
    _assert_greedy_matches_uncached(mixtral, PROMPTS, out.token_ids)
    # routing statistics of an eager forward, and the summed auxiliary loss
    forward.forward_full(mixtral.model, jnp.array([PROMPTS[0]]), jnp.array([7]))
    stats = moe_stats(mixtral.model)
    assert len(stats) == 2 and sum(stats[0]["tokens_per_expert"]) == 7 * 2
    assert float(moe_aux_loss(mixtral.model)) > 0


def _hf_mixtral_block(w, prefix, x, k):
    """Hugging Face MixtralSparseMoeBlock in numpy, from HF-named tensors."""
    logits = x @ w[f"{prefix}.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :k]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        g = probs[t, top[t]] / probs[t, top[t]].sum()
        for j, e in enumerate(top[t]):
            p = f"{prefix}.experts.{e}"
            a = x[t] @ w[f"{p}.w1.weight"].T
            y[t] += g[j] * ((a / (1 + np.exp(-a)) * (x[t] @ w[f"{p}.w3.weight"].T)) @ w[f"{p}.w2.weight"].T)
    return y


def _hf_qwen2_moe_block(w, prefix, x, k, norm_topk):
    """Hugging Face Qwen2MoeSparseMoeBlock in numpy: softmax, top-k (optionally renormalised), shared expert."""
    logits = x @ w[f"{prefix}.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :k]
    silu = lambda a: a / (1 + np.exp(-a))

    def mlp(p, v):
        hidden = silu(v @ w[f"{p}.gate_proj.weight"].T) * (v @ w[f"{p}.up_proj.weight"].T)
        return hidden @ w[f"{p}.down_proj.weight"].T

    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        g = probs[t, top[t]]
        g = g / g.sum() if norm_topk else g
        for j, e in enumerate(top[t]):
            y[t] += g[j] * mlp(f"{prefix}.experts.{e}", x[t])
    gate = 1 / (1 + np.exp(-(x @ w[f"{prefix}.shared_expert_gate.weight"].T)))
    return y + gate * mlp(f"{prefix}.shared_expert", x)


@pytest.mark.parametrize("name", ["mixtral-tiny", "qwen2moe-tiny"])
def test_hf_folder_roundtrip_and_hf_block_semantics(name, tmp_path):
    cfg = PRESETS[name]
    src = PiKVModel.from_pretrained("random:" + name, seed=3)
    weights = {k: np.asarray(v) for k, v in model_to_hf_weights(src.model).items()}
    assert sorted(weights) == sorted(expected_hf_names(cfg))
    block = "block_sparse_moe" if name.startswith("mixtral") else "mlp"
    expert_names = ("w1", "w2", "w3") if name.startswith("mixtral") else ("gate_proj", "up_proj", "down_proj")
    for e in range(cfg.num_experts):
        for n in expert_names:
            assert f"model.layers.1.{block}.experts.{e}.{n}.weight" in weights
    save_hf_folder(str(tmp_path), cfg, weights, max_shard_bytes=60_000)
    loaded = PiKVModel.from_pretrained(str(tmp_path))
    assert loaded.config.num_experts == cfg.num_experts
    np.testing.assert_allclose(full_logits(loaded.model, PROMPTS), full_logits(src.model, PROMPTS), atol=1e-5)
    # the MoE block equals Hugging Face's block computed from the checkpoint tensors
    x = np.asarray(jax.random.normal(jax.random.key(0), (9, cfg.hidden_size)))
    mine = np.asarray(loaded.model.layers[1].mlp(jnp.asarray(x)))
    prefix = f"model.layers.1.{block}"
    if name.startswith("mixtral"):
        ref = _hf_mixtral_block(weights, prefix, x.astype(np.float64), cfg.num_experts_per_tok)
    else:
        ref = _hf_qwen2_moe_block(weights, prefix, x.astype(np.float64), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_loading_reports_missing_and_misshapen_expert_tensors():
    cfg = PRESETS["mixtral-tiny"]
    model = PiKVModel.from_pretrained("random:mixtral-tiny").model
    w = {k: np.asarray(v) for k, v in model_to_hf_weights(model).items()}
    missing = dict(w)
    del missing["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ValueError, match=r"missing tensors .*experts\.2\.w3\.weight"):
        build_model(cfg, missing)
    bad = dict(w)
    bad["model.layers.1.block_sparse_moe.experts.1.w2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"experts\.1\.w2\.weight has shape \(3, 3\), expected \(64, 64\)"):
        build_model(cfg, bad)


def test_moe_config_roundtrip_and_errors():
    for name in ("mixtral-tiny", "qwen2moe-tiny", "qwen3moe-tiny", "mixtral-8x7b"):
        cfg = PRESETS[name]
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(head_dim=cfg.dim_per_head)
        if name.endswith("tiny"):  # the parameter count formula matches what the model allocates
            _, state = abstract_model(cfg)
            allocated = sum(v.get_value().size for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param))
            assert cfg.num_params() == allocated, name
    assert 46e9 < PRESETS["mixtral-8x7b"].num_params() < 47e9  # Mixtral 8x7B has 46.7B parameters
    qwen = PRESETS["qwen2moe-tiny"].to_hf_dict()
    assert qwen["model_type"] == "qwen2_moe" and qwen["architectures"] == ["Qwen2MoeForCausalLM"]
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        ModelConfig.from_hf_dict(dict(qwen, decoder_sparse_step=2))
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"):
        PRESETS["mixtral-tiny"].replace(num_experts_per_tok=5)
    with pytest.raises(ValueError, match="moe_router='nope' is not a router kind"):
        PRESETS["mixtral-tiny"].replace(moe_router="nope")
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        PRESETS["mixtral-tiny"].replace(num_experts=0)
    assert PRESETS["smollm2-135m"].num_experts == 0  # dense configs unchanged


def test_cli_flags_rebuild_the_model_with_another_router(mixtral):
    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    assert moe_overrides(parser.parse_args([])) == {}
    args = parser.parse_args(["--router", "topk_balanced", "--moe-capacity-factor", "2.0"])
    assert apply_moe_args(args, mixtral.config).moe_router == "topk_balanced"
    rebuilt = apply_moe_args(args, mixtral)
    layer = moe_layers(rebuilt.model)[0]
    assert layer.router.kind == "topk_balanced" and not layer.dropless
    # eval routing of topk_balanced equals the base router, and with capacity factor E/K nothing drops,
    # so the capacity path generates exactly what the dropless path generates
    a = mixtral.generate(PROMPTS, max_new_tokens=4, stop_ids=())
    b = rebuilt.generate(PROMPTS, max_new_tokens=4, stop_ids=())
    assert a.token_ids == b.token_ids
    # routers with parameters a checkpoint lacks start from zero and fall back to the checkpoint's gate
    fast = apply_moe_args(parser.parse_args(["--router", "fast"]), mixtral)
    assert float(jnp.abs(moe_layers(fast.model)[0].router.gate_bias[...]).sum()) == 0.0
    np.testing.assert_allclose(full_logits(fast.model, PROMPTS), full_logits(mixtral.model, PROMPTS), atol=1e-5)
    hier = apply_moe_args(parser.parse_args(["--router", "hierarchical"]), mixtral.config)
    hier_layer = build_model(hier, model_to_hf_weights(mixtral.model)).layers[0].mlp
    x = jax.random.normal(jax.random.key(1), (5, hier.hidden_size))
    np.testing.assert_allclose(np.asarray(hier_layer.router.route(x).probs),
                               np.asarray(moe_layers(mixtral.model)[0].router.route(x).probs), atol=1e-6)
    with pytest.raises(ValueError, match="exclude each other"):
        moe_overrides(parser.parse_args(["--moe-capacity-factor", "2", "--moe-dropless"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--router", "nope"])
    with pytest.raises(ValueError, match="--router only apply to mixture-of-experts models"):
        apply_moe_args(parser.parse_args(["--router", "eplb"]), PRESETS["smollm2-135m"])
