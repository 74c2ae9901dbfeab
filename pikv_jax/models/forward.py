"""Cache-aware forward passes of a `CausalLM`: uncached full forward, prefill, one decode step.

All three are pure functions of (model, cache, inputs) meant to be traced inside `jax.jit`; the
cache policy is a static object whose hooks decide what each layer's cache keeps.

Padding convention: prompts are right-padded; `lengths[b]` tokens of row b are real, positions are
0..lengths[b]-1 and padding gets position -1, so it is invisible to attention and never cached.
"""

from __future__ import annotations

import jax.numpy as jnp

from pikv_jax.attention import dispatch
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import KVCache
from pikv_jax.models.llama import CausalLM


def prompt_positions(tokens, lengths):
    """i32[B, S]: position of each prompt token, -1 for right padding."""
    idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(idx < lengths[:, None], idx, -1)


def _mlp_block(layer, x):
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_full(model: CausalLM, tokens, lengths, *, return_hidden: bool = False):
    """Uncached forward over a right-padded batch. tokens: i32[B, S] -> logits f32[B, S, V].

    The reference that cached generation must reproduce; also the teacher in distillation.
    """
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    x = model.embed(tokens)
    hidden = []
    for layer in model.layers:
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq)
        out, _ = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=cfg.sliding_window,
                                          causal_prefix=True)
        x = _mlp_block(layer, x + layer.self_attn.out(out))
        hidden.append(x)
    logits = model.logits(x)
    return (logits, hidden) if return_hidden else logits


def prefill(model: CausalLM, tokens, lengths, cache: KVCache, policy: CachePolicy):
    """Runs the prompt through the model, letting `policy` fill each layer's (empty) cache.

    tokens: i32[B, S] right-padded; lengths: i32[B] >= 1. Returns (logits f32[B, V] at each row's
    last real token, cache with length = lengths).
    """
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    mass_from = policy.prefill_mass_from(lengths)
    shared: dict = {}
    x = model.embed(tokens)
    new_layers = []
    for i, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq)
        out, key_mass = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=cfg.sliding_window,
                                                 mass_from=mass_from, causal_prefix=True)
        ctx = PrefillContext(q=q, k=k, v=v, pos=pos, lengths=lengths, key_mass=key_mass, shared=shared)
        new_layers.append(policy.prefill(i, layer_cache, ctx))
        x = _mlp_block(layer, x + layer.self_attn.out(out))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    logits = model.logits(last)[:, 0]
    return logits, cache.replace(layers=tuple(new_layers), length=lengths.astype(jnp.int32))


def decode_step(model: CausalLM, cache: KVCache, tokens, active, policy: CachePolicy):
    """Feeds one token per row. tokens: i32[B]; active: bool[B] (inactive rows leave the cache as is).

    Per layer: the policy picks a slot (free or victim), the new key/value is written there, the
    query attends over the cache (which now includes itself) and the policy observes the per-slot
    attention mass. Returns (logits f32[B, V], new cache, wrote bool[B]) where `wrote` is False for
    rows that had no room in some layer (a full, non-evicting cache).
    """
    cfg = model.config
    q_pos = cache.length
    inv_freq = model.inv_freq()
    x = model.embed(tokens[:, None])  # [B, 1, E]
    new_layers = []
    wrote = active
    for i, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, q_pos[:, None], inv_freq)
        slot, ok = policy.decode_slot(i, layer_cache, q_pos)
        writing = active & ok
        wrote = wrote & ok
        layer_cache = dispatch.write_token(layer_cache, k[:, 0], v[:, 0], q_pos, slot, writing)
        out, mass = dispatch.decode_attention(q[:, 0], layer_cache, q_pos, sliding_window=cfg.sliding_window)
        new_layers.append(policy.observe(i, layer_cache, mass, q_pos, writing))
        x = _mlp_block(layer, x + layer.self_attn.out(out[:, None]))
    logits = model.logits(x)[:, 0]
    length = cache.length + wrote.astype(jnp.int32)
    return logits, cache.replace(layers=tuple(new_layers), length=length), wrote


__all__ = ["forward_full", "prefill", "decode_step", "prompt_positions"]
