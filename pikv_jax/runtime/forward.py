"""Cache-aware forward passes of a `CausalLM`: uncached full forward, prefill, one decode step.

All three are pure functions of (model, cache, inputs) meant to be traced inside `jax.jit`; the
cache policy is a static object whose hooks decide what each layer's cache keeps.

Padding convention: prompts are right-padded; `lengths[b]` tokens of row b are real, positions are
0..lengths[b]-1 and padding gets position -1, so it is invisible to attention and never cached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pikv_jax.attention import dispatch
from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.attention.rope import apply_rope
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.expert_kv import ROUTER_LOGITS, wants_router_logits
from pikv_jax.cache.policies.kvzip import CONTEXT_SCORES, context_scorer
from pikv_jax.cache.state import KVCache
from pikv_jax.intmath import cdiv
from pikv_jax.models.llama import CausalLM


def prompt_positions(tokens, lengths):
    """i32[B, S]: position of each prompt token, -1 for right padding."""
    idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(idx < lengths[:, None], idx, -1)


def _mlp_block(layer, x):
    return x + layer.mlp(layer.post_attention_layernorm(x))


def router_logits(layer, h):
    """The MoE gate logits f32[B, S, E] of decoder `layer` for hidden states h [B, S, H] (a one-line
    ValueError for a dense layer)."""
    router = getattr(layer.mlp, "router", None)
    if router is None:
        raise ValueError("expert_kv(router=moe) needs an MoE model (config.num_experts set); dense models use "
                         "router=kmeans")
    return router.gate(h).astype(jnp.float32)


def forward_full(model: CausalLM, tokens, lengths, *, return_hidden: bool = False, return_kv: bool = False):
    """Uncached forward over a right-padded batch. tokens: i32[B, S] -> logits f32[B, S, V].

    The reference that cached generation must reproduce; also the teacher in distillation.
    return_hidden adds each layer's output [B, S, E]; return_kv each layer's (k after RoPE, v)
    [B, S, Hkv, D] (KVzip's reconstruction pass attends to them).
    """
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    x = model.embed(tokens)
    hidden, kv = [], []
    for layer in model.layers:
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq)
        out, _ = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=cfg.sliding_window,
                                          causal_prefix=True)
        x = _mlp_block(layer, x + layer.self_attn.out(out))
        hidden.append(x)
        kv.append((k, v))
    logits = model.logits(x)
    extra = ([hidden] if return_hidden else []) + ([kv] if return_kv else [])
    return (logits, *extra) if extra else logits


def prefill(model: CausalLM, tokens, lengths, cache: KVCache, policy: CachePolicy):
    """Runs the prompt through the model, letting `policy` fill each layer's (empty) cache.

    The prompt's own attention is always exact (full causal attention over the prompt); the
    policy only decides what is kept for later tokens (kvpress semantics).
    tokens: i32[B, S] right-padded; lengths: i32[B] >= 1. Returns (logits f32[B, V] at each row's
    last real token, cache with length = lengths).
    """
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    mass_from = policy.prefill_mass_from(lengths)
    shared: dict = {}
    # KVzip scores every layer's prompt KV from a repeat pass that needs all of them, so its layers
    # select after the forward (from the KV this forward computes, not a second forward of the prompt)
    kvzip = context_scorer(policy)
    x = model.embed(tokens)
    new_layers, deferred = [], []
    for i, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
        h = layer.input_layernorm(x)
        q_raw, k_raw, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq, rope=False)
        q, k = apply_rope(q_raw, jnp.maximum(pos, 0), inv_freq), apply_rope(k_raw, jnp.maximum(pos, 0), inv_freq)
        out, key_mass = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=cfg.sliding_window,
                                                 mass_from=mass_from, group_reduce=policy.group_reduce,
                                                 causal_prefix=True)
        own = {}
        if getattr(policy, "router", None) == "moe":  # expert_kv's MoE router: the gate on the attention input
            own[ROUTER_LOGITS] = router_logits(layer, h)
        raw = policy.stores_raw_keys
        ctx = PrefillContext(q=q, k=k, v=v, pos=pos, lengths=lengths, key_mass=key_mass, shared=shared,
                             q_raw=q_raw, k_raw=k_raw if raw else None, inv_freq=inv_freq)
        if kvzip is None:
            shared.update(own)
            new_layers.append(policy.prefill(i, layer_cache, ctx))
        else:
            deferred.append((ctx, own))
        x = _mlp_block(layer, x + layer.self_attn.out(out))
    if kvzip is not None:
        shared[CONTEXT_SCORES] = reconstruction_scores(model, tokens, lengths, kvzip.repeat_prompt_ids,
                                                       kvzip.chunk_size, kv=[(c.k, c.v) for c, _ in deferred])
        for i, ((ctx, own), layer_cache) in enumerate(zip(deferred, cache.layers)):  # in layer order, as above
            shared.update(own)
            new_layers.append(policy.prefill(i, layer_cache, ctx))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    logits = model.logits(last)[:, 0]
    return logits, cache.replace(layers=tuple(new_layers), length=lengths.astype(jnp.int32))


def decode_step(model: CausalLM, cache: KVCache, tokens, active, policy: CachePolicy):
    """Feeds one token per row. tokens: i32[B]; active: bool[B] (inactive rows leave the cache as is).

    Per layer: the policy names a slot (free, or a victim it evicts), the new key/value is written
    there, the query attends over the cache (which now includes itself), and the policy observes the
    per-slot attention mass. Returns (logits f32[B, V], new cache, wrote bool[B]); `wrote` is False
    for rows that had no room in some layer (a full, non-evicting cache).
    """
    cfg = model.config
    q_pos = cache.length
    inv_freq = model.inv_freq()
    x = model.embed(tokens[:, None])  # [B, 1, E]
    new_layers = []
    wrote = active
    for i, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, q_pos[:, None], inv_freq, rope=not policy.stores_raw_keys)
        if wants_router_logits(layer_cache):  # expert_kv(router=moe): the new token's gate logits
            layer_cache = layer_cache.replace(extra=dict(layer_cache.extra, gate=router_logits(layer, h)[:, 0]))
        layer_cache, slot, ok = policy.decode_slot(i, layer_cache, q_pos)
        writing = active & ok
        wrote = wrote & ok
        layer_cache = policy.write(i, layer_cache, k[:, 0], v[:, 0], q_pos, slot, writing)
        out, mass = policy.attend(i, layer_cache, q[:, 0], q_pos, sliding_window=cfg.sliding_window,
                                  inv_freq=inv_freq)
        new_layers.append(policy.observe(i, layer_cache, mass, q_pos, writing))
        x = _mlp_block(layer, x + layer.self_attn.out(out[:, None]))
    logits = model.logits(x)[:, 0]
    length = cache.length + wrote.astype(jnp.int32)
    return logits, cache.replace(layers=tuple(new_layers), length=length), wrote



def extend(model: CausalLM, cache: KVCache, tokens, lengths, policy: CachePolicy, *, targets=None,
           full_logprobs: bool = False):
    """Feeds a right-padded chunk of tokens after the cache's contents, one decode step per token
    (so decode-time eviction applies exactly as in generation), for teacher forcing.

    tokens: i32[B, T]; lengths: i32[B] real tokens per row (0 allowed). targets: optional i32[B, T],
    the token expected after each fed token. Returns (logits f32[B, V] after each row's last real
    token (zeros for rows with length 0), per-step output or None, cache); the per-step output is
    logprobs f32[B, T] of `targets` (0 past a row's length), or with `full_logprobs` the whole
    log-softmax f32[B, T, V].
    """
    b, t = tokens.shape
    vocab = model.config.vocab_size
    tgt = None if targets is None else jnp.swapaxes(targets, 0, 1)

    def step(carry, i):
        cache, last = carry
        active = i < lengths
        logits, cache, _ = decode_step(model, cache, tokens[:, i], active, policy)
        last = jnp.where(active[:, None], logits, last)
        if full_logprobs:
            return (cache, last), jax.nn.log_softmax(logits, axis=-1)
        if tgt is None:
            return (cache, last), None
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[i][:, None], axis=-1)[:, 0]
        return (cache, last), jnp.where(active, lp, 0.0)

    (cache, last), per_step = jax.lax.scan(step, (cache, jnp.zeros((b, vocab), jnp.float32)), jnp.arange(t))
    if per_step is not None:
        per_step = jnp.swapaxes(per_step, 0, 1)
    return last, per_step, cache


# ------------------------------------------------------------------ KVzip's reconstruction pass
#
# pikv_jax/cache/policies/kvzip.py says what it scores and why. For each chunk c of `chunk_size`
# context positions, every row feeds [instruction ids ; its context tokens of chunk c] at positions
# L_b, L_b + 1, ... (right after its prompt). At every layer those queries attend to the whole
# prompt's KV (from an uncached forward) and causally to the chunk's own KV; the prompt part of the
# attention, maximised over the chunk's real queries and the GQA group, is folded into a running
# maximum per (layer, row, KV head, prompt position). Chunks run in a `lax.scan`: one chunk's
# attention is held at a time and the pass compiles once.


def _reconstruction_attend(q, keys, vals, q_pos, k_pos, n_prompt: int, sliding_window):
    """q [B, T, H, D] over keys/vals [B, S + T, Hkv, D] -> (out [B, T, H, D], max prompt attention
    f32[B, Hkv, S] over real queries and the GQA group)."""
    b, t, h, d = q.shape
    hk = keys.shape[2]
    qg = q.reshape(b, t, hk, h // hk, d)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, keys, preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, None, :, None], k_pos[:, None, None, None, :], sliding_window)
    mask = mask & (q_pos >= 0)[:, None, None, :, None] & (k_pos >= 0)[:, None, None, None, :]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, vals.astype(jnp.float32)).reshape(b, t, h, d)
    return out.astype(q.dtype), jnp.max(probs[..., :n_prompt], axis=(2, 3))


def reconstruction_scores(model: CausalLM, tokens: Int[Array, "b s"], lengths: Int[Array, " b"],
                          repeat_ids, chunk_size: int, kv=None) -> tuple[Float[Array, "b hk s"], ...]:
    """Per layer f32[B, Hkv, S]: the largest attention each prompt KV receives from the repeat queries
    (0 for padding). repeat_ids: the instruction's token ids (may be empty). kv: the prompt's per-layer
    (keys after RoPE, values), [B, S, Hkv, D] each, when the caller's forward already computed them;
    else one forward computes them."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cfg = model.config
    b, s = tokens.shape
    pos = prompt_positions(tokens, lengths)
    if kv is None:
        _, kv = forward_full(model, tokens, lengths, return_kv=True)
    inv_freq = model.inv_freq()
    n_instr = len(repeat_ids)
    chunk = min(chunk_size, s)
    instr = jnp.broadcast_to(jnp.asarray(list(repeat_ids), jnp.int32)[None, :], (b, n_instr))

    def one_chunk(scores, c):
        idx = c * chunk + jnp.arange(chunk)  # context positions this chunk repeats
        real = idx[None, :] < lengths[:, None]  # [B, chunk]
        body = jnp.take(tokens, jnp.minimum(idx, s - 1), axis=1)
        ids = jnp.concatenate([instr, body], axis=1)  # [B, T]
        ok = jnp.concatenate([jnp.ones((b, n_instr), bool), real], axis=1)
        # positions right after the row's prompt; a short last chunk's padding is invisible (-1)
        q_pos = jnp.where(ok, lengths[:, None] + jnp.arange(n_instr + chunk)[None, :], -1).astype(jnp.int32)
        k_pos = jnp.concatenate([pos, q_pos], axis=1)
        x = model.embed(ids)
        new = []
        for layer, (k_ctx, v_ctx), sc in zip(model.layers, kv, scores):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, jnp.maximum(q_pos, 0), inv_freq)
            keys = jnp.concatenate([k_ctx.astype(k.dtype), k], axis=1)
            vals = jnp.concatenate([v_ctx.astype(v.dtype), v], axis=1)
            out, mx = _reconstruction_attend(q, keys, vals, q_pos, k_pos, s, cfg.sliding_window)
            new.append(jnp.maximum(sc, mx))
            x = _mlp_block(layer, x + layer.self_attn.out(out))
        return tuple(new), None

    hk = kv[0][0].shape[2]
    init = tuple(jnp.zeros((b, hk, s), jnp.float32) for _ in model.layers)
    scores, _ = jax.lax.scan(one_chunk, init, jnp.arange(cdiv(s, chunk)))
    return scores


__all__ = ["decode_step", "extend", "forward_full", "prefill", "prompt_positions", "reconstruction_scores"]
