"""KVzip: the chunked reconstruction pass against a direct NumPy computation (one uncached forward
per chunk over prompt + instruction + chunk), and the policy's selection, wrappers and errors."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import numpy_reference
import policy_helpers as ph
import pytest
from flax import nnx

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies import H2O, AdaKV, Composite, KVzip, make_policy
from pikv_jax.cache.policies.kvzip import context_scorer, with_repeat_prompt
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.runtime.forward import reconstruction_scores

INSTR = (7, 3, 9)


def np_kvzip_scores(cfg, weights, prompt, instr, chunk):
    """Per layer f64[Hkv, L]: max attention over the GQA group and the repeat queries, chunk by chunk."""
    h, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    n = len(prompt)
    out = None
    for c0 in range(0, n, chunk):
        seq = list(prompt) + list(instr) + list(prompt[c0: c0 + chunk])
        probs: list = []
        numpy_reference.forward(cfg, weights, seq, probs_out=probs)
        got = [p[:, n:, :n].max(axis=1).reshape(hk, h // hk, n).max(axis=1) for p in probs]
        out = got if out is None else [np.maximum(a, b) for a, b in zip(out, got)]
    return out


@pytest.mark.parametrize("chunk", [5, 64])
def test_reconstruction_scores_match_direct_computation(chunk):
    cfg, weights, graphdef, params = ph.tiny_model()
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(1)
    lengths = [13, 9]
    tokens = np.zeros((2, 16), np.int32)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    got = reconstruction_scores(model, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), INSTR, chunk)
    for b, p in enumerate(prompts):
        want = np_kvzip_scores(cfg.to_hf_dict(), weights, p, INSTR, chunk)
        for layer, w in enumerate(want):
            np.testing.assert_allclose(np.asarray(got[layer][b, :, : len(p)]), w, rtol=2e-4, atol=2e-5)
            assert np.all(np.asarray(got[layer][b, :, len(p):]) == 0.0)  # padding receives nothing


def test_prefill_scores_from_its_own_kv_equal_the_standalone_pass(monkeypatch):
    """The prefill hands KVzip the reconstruction scores computed from the KV of its own forward (no
    second forward of the prompt); they equal `reconstruction_scores` run on its own forward, per
    layer, and the selection uses them (each head keeps the top scores besides the sinks)."""
    import jax

    from pikv_jax.cache.policies import init_policy_cache
    from pikv_jax.cache.policies.kvzip import CONTEXT_SCORES
    from pikv_jax.runtime import forward

    seen = []

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Recording(KVzip):
        def prefill_scores(self, layer, ctx):
            seen.append(np.asarray(ctx.shared[CONTEXT_SCORES][layer]))
            return super().prefill_scores(layer, ctx)

    cfg, _, graphdef, params = ph.tiny_model()
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(3)
    lengths = jnp.asarray([20, 14], jnp.int32)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 20)), jnp.int32)
    policy = Recording(budget_ratio=0.5, n_sink=2, chunk_size=6, repeat_prompt_ids=INSTR)
    caps = tuple(policy.capacity_for(i, 20, 0) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, 2, caps, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                              dtype=jnp.float32)
    def second_forward(*a, **k):
        raise AssertionError("the prefill ran a second forward of the prompt for KVzip's scores")

    monkeypatch.setattr(forward, "forward_full", second_forward)
    with jax.disable_jit():
        _, cache = forward.prefill(model, tokens, lengths, cache, policy)
    monkeypatch.undo()
    want = reconstruction_scores(model, tokens, lengths, INSTR, 6)
    assert len(seen) == cfg.num_hidden_layers
    for layer, (got, w, lc) in enumerate(zip(seen, want, cache.layers)):
        np.testing.assert_allclose(got, np.asarray(w), rtol=1e-5, atol=1e-6)
        pos = np.asarray(lc.head_positions())
        for b, n in enumerate(np.asarray(lengths)):
            for h in range(pos.shape[1]):
                kept = set(pos[b, h][pos[b, h] >= 0].tolist())
                rest = [p for p in range(2, n) if p not in kept]
                assert {0, 1} <= kept and len(kept) == int(np.ceil(0.5 * n))
                assert min(got[b, h, sorted(kept - {0, 1})]) >= max(got[b, h, rest])


def test_generate_keeps_each_rows_budget():
    """Through PiKVModel.generate (which runs the reconstruction pass): every layer and head keeps
    ceil(0.25 L_b) prompt tokens of row b, plus the fed decoded tokens. The per-step invariants
    (sinks, no duplicates, capacity) are checked for kvzip by tests/cache/test_policy_properties.py."""
    model = PiKVModel.from_config(ph.tiny_model()[0])
    rng = np.random.default_rng(2)
    lengths = (60, 41)
    prompts = [rng.integers(3, 90, n).tolist() for n in lengths]
    out = model.generate(prompts, 4, policy=KVzip(budget_ratio=0.25, chunk_size=16, n_sink=2), stop_ids=())
    assert [len(t) for t in out.token_ids] == [4, 4]
    assert out.stats["kept_tokens"] == sum(int(np.ceil(0.25 * n)) for n in lengths) + 2 * 3


def test_wrappers_find_and_fill_the_scorer():
    kv = KVzip(budget_ratio=0.5)
    for policy in (kv, AdaKV(scorer=kv, budget_ratio=0.5), Composite(prefill_policy=kv, decode_policy=H2O()),
                   QuantizedPolicy(bits=4, inner=kv)):
        assert context_scorer(policy) is kv
        filled = with_repeat_prompt(policy, [5, 6])
        assert context_scorer(filled).repeat_prompt_ids == (5, 6)
    assert context_scorer(H2O(budget_ratio=0.5)) is None
    assert make_policy("adakv", scorer="kvzip", budget_ratio=0.5).label == "adakv(kvzip)"


@pytest.mark.parametrize("kwargs, match", [({"chunk_size": 0}, "chunk_size must be"),
                                           ({"decode_evict": True}, "compose it with a decode-time policy")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVzip(budget_ratio=0.5, **kwargs)


def test_global_layer_fractions_match_a_threshold_count():
    """The global ranking against an independent count: with distinct scores, a layer's share is
    the number of its unprotected scores at or above the total-th largest, over the mean count."""
    from pikv_jax.runtime.capture import global_layer_fractions

    rng = np.random.default_rng(3)
    for ratio, n_sink, window in [(0.25, 2, 3), (0.5, 0, 0), (0.5, 4, 8)]:
        scores = rng.permutation(5 * 3 * 40).reshape(5, 3, 40).astype(np.float32) * (1 + np.arange(5))[:, None, None]
        got = global_layer_fractions(scores, ratio, n_sink=n_sink, window=window)
        body = scores[:, :, n_sink: 40 - window]
        total = 5 * 3 * (int(np.ceil(ratio * 40)) - n_sink - window)
        threshold = np.sort(body.ravel())[::-1][total - 1]
        counts = (body >= threshold).sum(axis=(1, 2))
        np.testing.assert_allclose(got, counts / counts.mean(), atol=1e-4)
        assert abs(np.mean(got) - 1) < 1e-3 and got[-1] > got[0]  # later layers score higher here
    assert global_layer_fractions(np.ones((3, 2, 8)), 0.25, n_sink=1, window=1) == (1.0, 1.0, 1.0)  # nothing to choose


def test_global_scope_spreads_the_same_total_over_layers():
    """kvzip(budget_scope=global) through generate: bind_policy calibrates layer shares (mean 1), the
    layers' caches get unequal sizes, their total stays within rounding of the uniform total, every
    layer keeps each row's sinks, and adakv(kvzip(global)) gets the same shares."""
    model = PiKVModel.from_config(ph.tiny_model()[0])
    uniform = KVzip(budget_ratio=0.25, chunk_size=16, n_sink=2)
    bound = model.bind_policy(KVzip(budget_ratio=0.25, chunk_size=16, n_sink=2, budget_scope="global"))
    fractions = bound.layer_fractions
    assert len(fractions) == model.config.num_hidden_layers and abs(np.mean(fractions) - 1) < 1e-3
    s = 64
    caps = [bound.layer_budget(i, s) for i in range(len(fractions))]
    assert abs(sum(caps) - len(caps) * uniform.layer_budget(0, s)) <= len(caps)
    ada = model.bind_policy(AdaKV(scorer=KVzip(chunk_size=16, budget_scope="global"), budget_ratio=0.25, n_sink=2,
                                  obs_window=4))
    assert [ada.layer_fraction(i) for i in range(len(fractions))] == list(context_scorer(ada).layer_fractions)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 90, n).tolist() for n in (64, 50)]
    out = model.generate(prompts, 3, policy=bound, stop_ids=())
    assert [len(t) for t in out.token_ids] == [3, 3]
    # kept_tokens: resident tokens per row averaged over layers and heads, summed over rows; each
    # layer keeps min(its share of the row's budget, the row's length) plus the 2 fed tokens
    lengths = jnp.asarray([64, 50], jnp.int32)
    per_layer = [np.asarray(bound.row_budget(i, lengths, 64)) for i in range(len(fractions))]
    assert out.stats["kept_tokens"] == pytest.approx(float(np.mean(per_layer, axis=0).sum()) + 2 * 2)
    assert len(set(caps)) > 1  # the tiny model's layers do score differently


def test_global_scope_errors():
    with pytest.raises(ValueError, match="budget_scope must be one of layer, global"):
        KVzip(budget_ratio=0.5, budget_scope="model")
    with pytest.raises(ValueError, match="layer_fractions are the calibrated layer shares"):
        KVzip(budget_ratio=0.5, layer_fractions=(1.0, 1.0))
    with pytest.raises(ValueError, match="needs its calibrated layer_fractions"):
        KVzip(budget_ratio=0.5, budget_scope="global").layer_budget(0, 64)
    model = PiKVModel.from_config(ph.tiny_model()[0])
    with pytest.raises(ValueError, match="needs a ratio budget"):
        model.bind_policy(KVzip(budget_tokens=16, budget_scope="global"))
