"""An independent plain-NumPy forward pass of a Llama-family decoder over Hugging Face-named weights.

Written from the published model definitions (Llama, Llama-3.1 RoPE scaling, Qwen2, Qwen3, Mistral),
not from `pikv_jax`: float64 throughout, one sequence at a time, no padding, no cache. RoPE is
applied with complex numbers on the (x[:d/2], x[d/2:]) pairs, which is what Hugging Face's
rotate-half formulation computes. The tests compare `pikv_jax`'s logits against `forward` here.

Config semantics follow Hugging Face's `config.json` for each `model_type`:
  llama    q/k/v/o bias iff `attention_bias`; optional `rope_scaling` (llama3 or linear)
  qwen2    q/k/v bias always (no o bias); sliding window only with `use_sliding_window`
  qwen3    RMSNorm over head_dim on q and k (before RoPE); bias iff `attention_bias`
  mistral  `sliding_window` (a query at i sees keys j with i - W < j <= i)
"""

from __future__ import annotations

import math

import numpy as np


def llama3_inv_freq_loop(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """Llama-3.1 RoPE frequencies, one frequency at a time, as in Meta's reference `apply_scaling`."""
    out = []
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out, np.float64)


def inv_freq(cfg: dict, head_dim: int) -> np.ndarray:
    theta = float(cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling") or None
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return np.array([1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)])
    if kind == "linear":
        return np.array([1.0 / theta ** (i / head_dim) / rs["factor"] for i in range(0, head_dim, 2)])
    if kind == "llama3":
        return llama3_inv_freq_loop(head_dim, theta, rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                                    rs["original_max_position_embeddings"])
    raise ValueError(f"numpy reference: unknown rope type {kind!r}")


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x: [T, H, D]; rotates pair (x[..., j], x[..., j + D/2]) at position t by angle t * freqs[j]."""
    t = x.shape[0]
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    rot = np.exp(1j * np.arange(t)[:, None] * freqs[None, :])[:, None, :]  # [T, 1, D/2]
    z = z * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(cfg: dict, weights: dict, tokens, *, probs_out: list | None = None) -> np.ndarray:
    """Logits f64[T, V] for one unpadded token sequence. `cfg` is a Hugging Face config.json dict.
    probs_out: a list that receives each layer's attention probabilities f64[H, T, T]."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    model_type = cfg["model_type"]
    e = cfg["hidden_size"]
    h = cfg["num_attention_heads"]
    hk = cfg.get("num_key_value_heads") or h
    d = cfg.get("head_dim") or e // h
    eps = cfg["rms_norm_eps"]
    n_layers = cfg["num_hidden_layers"]
    qkv_bias = True if model_type == "qwen2" else bool(cfg.get("attention_bias", False))
    o_bias = model_type in ("llama", "qwen3") and bool(cfg.get("attention_bias", False))
    qk_norm = model_type == "qwen3"
    if model_type == "mistral":
        window = cfg.get("sliding_window")
    elif model_type in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    else:
        window = None
    freqs = inv_freq(cfg, d)

    tokens = np.asarray(tokens)
    t = len(tokens)
    x = w["model.embed_tokens.weight"][tokens]  # [T, E]
    i_idx, j_idx = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = j_idx <= i_idx
    if window is not None:
        allowed &= (i_idx - j_idx) < window
    for li in range(n_layers):
        p = f"model.layers.{li}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name, inp):
            y = inp @ w[p + name + ".weight"].T
            return y

        q = proj("self_attn.q_proj", a)
        k = proj("self_attn.k_proj", a)
        v = proj("self_attn.v_proj", a)
        if qkv_bias:
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q, k, v = q.reshape(t, h, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
        if qk_norm:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, freqs), rope(k, freqs)
        heads, layer_probs = [], []
        for hi in range(h):
            kv = hi // (h // hk)  # query head hi reads KV head hi // group
            s = q[:, hi] @ k[:, kv].T / math.sqrt(d)
            s = np.where(allowed, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True)
            layer_probs.append(pr)
            heads.append(pr @ v[:, kv])
        if probs_out is not None:
            probs_out.append(np.stack(layer_probs))
        attn = np.concatenate(heads, axis=-1)  # [T, H*D]
        o = attn @ w[p + "self_attn.o_proj.weight"].T
        if o_bias:
            o = o + w[p + "self_attn.o_proj.bias"]
        x = x + o
        m = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = m @ w[p + "mlp.gate_proj.weight"].T
        up = m @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


def random_weights(cfg: dict, seed: int = 0, *, scale: float = 2.0) -> dict[str, np.ndarray]:
    """A random float32 checkpoint in Hugging Face's layout for `cfg` (a config.json dict).

    Every tensor is non-trivial: biases ~ N(0, 0.5), norm weights ~ N(1, 0.3), embeddings ~ N(0, 1)
    and projections ~ N(0, scale^2 / fan_in), which makes tiny models' greedy output varied rather
    than one repeated token.
    """
    rng = np.random.default_rng(seed)
    model_type = cfg["model_type"]
    e, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    h = cfg["num_attention_heads"]
    hk = cfg.get("num_key_value_heads") or h
    d = cfg.get("head_dim") or e // h
    qkv_bias = True if model_type == "qwen2" else bool(cfg.get("attention_bias", False))

    def lin(out_dim, in_dim):
        return rng.normal(0.0, scale / math.sqrt(in_dim), (out_dim, in_dim)).astype(np.float32)

    def norm(n):
        return rng.normal(1.0, 0.3, (n,)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.normal(0.0, 1.0, (v, e)).astype(np.float32),
         "model.norm.weight": norm(e)}
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = lin(v, e)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(e)
        w[p + "post_attention_layernorm.weight"] = norm(e)
        for name, rows in (("q", h * d), ("k", hk * d), ("v", hk * d)):
            w[p + f"self_attn.{name}_proj.weight"] = lin(rows, e)
            if qkv_bias:
                w[p + f"self_attn.{name}_proj.bias"] = rng.normal(0.0, 0.5, (rows,)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = lin(e, h * d)
        if model_type in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)):  # HF: o_proj biased too
            w[p + "self_attn.o_proj.bias"] = rng.normal(0.0, 0.5, (e,)).astype(np.float32)
        if model_type == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(d)
            w[p + "self_attn.k_norm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = lin(f, e)
        w[p + "mlp.up_proj.weight"] = lin(f, e)
        w[p + "mlp.down_proj.weight"] = lin(e, f)
    return w
