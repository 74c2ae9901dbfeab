"""StreamingLLM's `reindex_positions` flag: the cache stores keys before RoPE and attention rotates
them with their position inside the cache (sinks 0..n_sink-1, then the window contiguously), the
query with the last in-cache position.

- Before anything is evicted, in-cache positions are the original ones: logits equal the default
  mode (keys cached after RoPE with original positions) at every step.
- After eviction the two modes differ, and the re-indexed logits equal a plain-NumPy decoder
  (float64, written here from the model definition) that keeps sinks + the most recent tokens and
  rotates by in-cache position.
"""

from __future__ import annotations

import math

import numpy as np
import numpy_reference as npr
import policy_helpers as ph

from pikv_jax.cache.policies import StreamingLLM

N_SINK = 2


def np_rotate(x, positions, freqs):
    """Rotate-half RoPE of x [T, H, D] with one position per row."""
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.asarray(positions)[:, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


class NumpyStreaming:
    """StreamingLLM with re-indexed positions over HF-named float64 weights (one row, Llama)."""

    def __init__(self, cfg, weights, budget: int, n_sink: int):
        self.hf = cfg.to_hf_dict()
        self.w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        self.h, self.hk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        self.eps, self.n_layers = cfg.rms_norm_eps, cfg.num_hidden_layers
        self.freqs = npr.inv_freq(self.hf, self.d)
        self.budget, self.n_sink = budget, n_sink
        self.cache = [[] for _ in range(self.n_layers)]  # per layer: [(pos, k_raw [Hkv, D], v [Hkv, D])]

    def _p(self, li, name):
        return self.w[f"model.layers.{li}.{name}.weight"]

    def _proj(self, li, a):
        t = a.shape[0]
        q = (a @ self._p(li, "self_attn.q_proj").T).reshape(t, self.h, self.d)
        k = (a @ self._p(li, "self_attn.k_proj").T).reshape(t, self.hk, self.d)
        v = (a @ self._p(li, "self_attn.v_proj").T).reshape(t, self.hk, self.d)
        return q, k, v

    def _mlp(self, li, x):
        m = npr.rms_norm(x, self._p(li, "post_attention_layernorm"), self.eps)
        return x + (npr.silu(m @ self._p(li, "mlp.gate_proj").T) * (m @ self._p(li, "mlp.up_proj").T)) @ \
            self._p(li, "mlp.down_proj").T

    def _logits(self, x):
        x = npr.rms_norm(x, self.w["model.norm.weight"], self.eps)
        return x @ self.w["lm_head.weight"].T

    def _attend(self, q, k, v, allowed):
        g = self.h // self.hk
        heads = []
        for j in range(self.h):
            s = k[:, j // g] @ q[:, j].T / math.sqrt(self.d)  # [Tk, Tq]
            s = np.where(allowed, s.T, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, j // g])
        return np.concatenate(heads, axis=-1)

    def _keep(self, entries):
        """Sinks + the most recent budget - sinks entries (StreamingLLM's kept set)."""
        sinks = [e for e in entries if e[0] < self.n_sink]
        rest = [e for e in entries if e[0] >= self.n_sink]
        return sinks + rest[len(rest) - (self.budget - len(sinks)):] if len(entries) > self.budget else entries

    def prefill(self, tokens):
        """Exact causal attention over the prompt; returns the last position's logits."""
        t = len(tokens)
        x = self.w["model.embed_tokens.weight"][np.asarray(tokens)]
        allowed = np.arange(t)[None, :] <= np.arange(t)[:, None]
        for li in range(self.n_layers):
            a = npr.rms_norm(x, self._p(li, "input_layernorm"), self.eps)
            q, k, v = self._proj(li, a)
            pos = np.arange(t)
            x = x + self._attend(np_rotate(q, pos, self.freqs), np_rotate(k, pos, self.freqs), v, allowed) @ \
                self._p(li, "self_attn.o_proj").T
            x = self._mlp(li, x)
            self.cache[li] = self._keep([(p, k[p], v[p]) for p in range(t)])
        self.length = t
        return self._logits(x[-1:])[0]

    def step(self, token):
        x = self.w["model.embed_tokens.weight"][[token]]
        for li in range(self.n_layers):
            a = npr.rms_norm(x, self._p(li, "input_layernorm"), self.eps)
            q, k, v = self._proj(li, a)
            self.cache[li] = self._keep(self.cache[li] + [(self.length, k[0], v[0])])
            entries = self.cache[li]
            n = len(entries)
            rel = np.arange(n)  # sinks first, then the window in order: positions inside the cache
            ks = np_rotate(np.stack([e[1] for e in entries]), rel, self.freqs)
            vs = np.stack([e[2] for e in entries])
            qr = np_rotate(q, [n - 1], self.freqs)
            x = x + self._attend(qr, ks, vs, np.ones((1, n), bool)) @ self._p(li, "self_attn.o_proj").T
            x = self._mlp(li, x)
        self.length += 1
        return self._logits(x)[0]


def _data(seed, lengths, s, n):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 97, (len(lengths), s)), np.asarray(lengths), rng.integers(3, 97, (len(lengths), n))


def _all_logits(out):
    return np.concatenate([out[0][None], out[1]], axis=0)  # [1 + n, B, V]


def test_reindexed_cache_stores_raw_keys_and_matches_default_before_eviction():
    s, n, budget = 10, 5, 16  # at most 15 tokens: nothing is evicted
    tokens, lengths, dec = _data(0, [10, 6], s, n)
    re = ph.run_trace(StreamingLLM(budget_tokens=budget, n_sink=N_SINK, reindex_positions=True), tokens, lengths, dec)
    de = ph.run_trace(StreamingLLM(budget_tokens=budget, n_sink=N_SINK), tokens, lengths, dec)
    np.testing.assert_allclose(_all_logits(re), _all_logits(de), rtol=1e-5, atol=1e-5)
    ks, ks_raw, _, _ = ph.uncached_kv(tokens, lengths, dec)
    final = ph.step_snapshot(re[4], n - 1)
    for layer in range(ph.NUM_LAYERS):
        for r, L in enumerate(lengths):
            for h in range(2):
                pos = final["pos"][layer][r, h]
                for c in np.nonzero(pos >= 0)[0]:
                    p = int(pos[c])
                    if p < L or layer == 0:  # keys before RoPE, not after
                        np.testing.assert_allclose(final["k"][layer][r, h, c], ks_raw[layer][r, p, h], atol=1e-5)
                        if p > 0:
                            assert not np.allclose(final["k"][layer][r, h, c], ks[layer][r, p, h], atol=1e-3)


def test_reindexed_logits_after_eviction_equal_numpy_and_differ_from_default():
    s, n, budget = 10, 6, 8  # prompt of 10 compressed to 8, then one eviction per step
    tokens, lengths, dec = _data(1, [10, 7], s, n)
    re = ph.run_trace(StreamingLLM(budget_tokens=budget, n_sink=N_SINK, reindex_positions=True), tokens, lengths, dec)
    de = ph.run_trace(StreamingLLM(budget_tokens=budget, n_sink=N_SINK), tokens, lengths, dec)
    got, default = _all_logits(re), _all_logits(de)
    cfg, weights, _, _ = ph.tiny_model()
    for r, L in enumerate(lengths):
        ref = NumpyStreaming(cfg, weights, budget, N_SINK)
        want = [ref.prefill(tokens[r, :L])] + [ref.step(int(t)) for t in dec[r]]
        np.testing.assert_allclose(got[:, r], np.stack(want), rtol=1e-4, atol=1e-4, err_msg=f"row {r}")
        # the prompt's own attention is exact in both modes; once tokens are evicted they differ
        np.testing.assert_allclose(got[0, r], default[0, r], rtol=1e-5, atol=1e-5)
        evicted = [t for t in range(1, n + 1) if L + t > budget]
        assert evicted and max(np.abs(got[t, r] - default[t, r]).max() for t in evicted) > 1e-3
        # steps before the row's first eviction still agree
        for t in range(1, n + 1):
            if L + t <= budget:
                np.testing.assert_allclose(got[t, r], default[t, r], rtol=1e-5, atol=1e-5)
