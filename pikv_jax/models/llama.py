"""Llama-family decoder in Flax NNX: Llama (incl. Llama-3 RoPE scaling), Qwen2, Qwen3, Mistral, and
their MoE variants (Mixtral, Qwen2-MoE, Qwen3-MoE: see models/moe_llama.py).

The modules only hold parameters and compute projections; how attention reads and writes the KV
cache lives in `runtime/forward.py`, so cache policies stay pure functions outside the modules.
Submodule names mirror Hugging Face's (`layers.{i}.self_attn.q_proj`, ...) so that checkpoint
loading is a rename plus a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.attention.rope import apply_rope, rope_inv_freq
from pikv_jax.config import ModelConfig
from pikv_jax.models.moe_llama import moe_mlp


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class Attention(nnx.Module):
    """Projections of grouped-query attention; the attention itself is cache-aware (forward.py)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, d = cfg.hidden_size, cfg.dim_per_head
        h, hk = cfg.num_attention_heads, cfg.num_key_value_heads
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(e, h * d, use_bias=cfg.attention_bias, **lin)
        self.k_proj = nnx.Linear(e, hk * d, use_bias=cfg.attention_bias, **lin)
        self.v_proj = nnx.Linear(e, hk * d, use_bias=cfg.attention_bias, **lin)
        self.o_proj = nnx.Linear(h * d, e, use_bias=cfg.o_proj_bias, **lin)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, hk, d
        self.qk_norm = cfg.qk_norm

    def qkv(self, x, positions, inv_freq, *, rope: bool = True):
        """x: [B, T, E] -> q [B, T, H, D], k and v [B, T, Hkv, D]; RoPE applied to q and k unless
        `rope` is False (policies that position keys inside the cache rotate them later)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rope:
            return q, k, v
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def out(self, attn):
        """attn: [B, T, H, D] -> [B, T, E]."""
        b, t = attn.shape[:2]
        return self.o_proj(attn.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.up_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.down_proj = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if cfg.num_experts > 0:  # Mixtral / Qwen-MoE: a sparse MoE block, still called as layer.mlp(x)

            self.mlp = moe_mlp(cfg, rngs=rngs, **kw)
        else:
            self.mlp = MLP(cfg, rngs=rngs, **kw)


class CausalLM(nnx.Module):
    """Decoder-only language model: embeddings, `num_hidden_layers` decoder layers, final norm, head."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs, **kw)

    def inv_freq(self) -> jax.Array:
        return rope_inv_freq(self.config.dim_per_head, self.config.rope_theta, self.config.rope_scaling)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def logits(self, x):
        """Final norm and output head; logits are returned in float32."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding[...]
            return jnp.einsum("...e,ve->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...]
        return jnp.einsum("...e,ev->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
