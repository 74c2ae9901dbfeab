"""An instrumented, differentiable uncached forward for distillation: teacher and students share it.

`forward_train(model, tokens, lengths)` computes exactly `runtime.forward.forward_full` (the
full-cache teacher), and optionally returns per-layer hidden states, attention outputs and the
MLP's input/output. Students change one thing: `attention(layer, q, k, v, pos) -> out` replaces the
exact attention of every layer, e.g. with keys/values reconstructed from a low-rank code (LoRA
compressor) or with a per-head mix of full and streaming attention (DuoAttention gates).

Shapes: tokens i32[B, T] right-padded, lengths i32[B]; q [B, T, H, D], k and v [B, T, Hkv, D]
(after RoPE), pos i32[B, T] (-1 = padding); attention outputs [B, T, H, D] before o_proj.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pikv_jax.attention import dispatch
from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.runtime.forward import prompt_positions

AttentionFn = Callable[..., jax.Array]  # (layer, q, k, v, pos) -> out [B, T, H, D]


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a forward exposes to the strategies (trace-time values).

    logits: f32[B, T - logits_from, V] for positions logits_from.. (None when not computed).
    hidden: residual stream after each decoder layer, [B, T, E] per layer (all layers or none).
    attn: attention output of each layer [B, T, H, D] (all layers or none).
    mlp_in / mlp_out: {layer: [B, T, E]} input (after post_attention_layernorm) and output of the MLP.
    """

    logits: jax.Array | None = None
    logits_from: int = 0
    hidden: tuple = ()
    attn: tuple = ()
    mlp_in: dict = dataclasses.field(default_factory=dict)
    mlp_out: dict = dataclasses.field(default_factory=dict)


def exact_attention(sliding_window=None) -> AttentionFn:
    """The teacher's attention: full causal attention (the uncached forward's)."""

    def attend(layer, q, k, v, pos):
        return dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=sliding_window, causal_prefix=True)[0]

    return attend


def masked_attention(q, k, v, q_pos, k_pos, allow=None, *, sliding_window=None):
    """Attention with an extra key mask. q [B, T, H, D], k, v [B, S, Hkv, D]; allow: optional bool
    broadcastable to [B, Hkv, G, T, S]. Returns probabilities f32[B, Hkv, G, T, S] (0 where masked)."""
    b, t, h, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, h // hk, d)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, None, :, None], k_pos[:, None, None, None, :], sliding_window)
    if allow is not None:
        mask = mask & allow
    return jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)


def apply_probs(probs, v, out_dtype):
    """probs f32[B, Hkv, G, T, S] @ v [B, S, Hkv, D] -> [B, T, H, D]."""
    b, hk, g, t, _ = probs.shape
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hk * g, v.shape[-1]).astype(out_dtype)


def forward_train(model, tokens, lengths, *, attention: AttentionFn | None = None, hidden: bool = False,
                  attn: bool = False, mlp_layers: tuple[int, ...] = (), logits_from: int | None = 0,
                  remat: bool = False, stop_after: int | None = None) -> Outputs:
    """Uncached forward of a CausalLM over a right-padded batch, with the hooks described above.

    logits_from: compute logits only for positions >= logits_from (None: no logits, e.g. when only
      hidden states are distilled; the vocabulary head is the most expensive matmul of small models).
    mlp_layers: layers whose MLP input/output are returned. remat: recompute each layer in the
    backward pass. stop_after: run only layers 0..stop_after (no logits).
    """
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    attention = attention if attention is not None else exact_attention(cfg.sliding_window)
    n = len(model.layers)
    mlp_layers = tuple(i % n for i in mlp_layers)
    last = n - 1 if stop_after is None else stop_after % n
    x = model.embed(tokens)
    hs, outs, m_in, m_out = [], [], {}, {}
    for i, layer in enumerate(model.layers):
        if i > last:
            break

        def body(x, layer=layer, i=i):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq)
            out = attention(i, q, k, v, pos)
            x = x + layer.self_attn.out(out)
            mi = layer.post_attention_layernorm(x)
            mo = layer.mlp(mi)
            return x + mo, (out, mi, mo)

        x, (out, mi, mo) = (jax.checkpoint(body) if remat else body)(x)
        if hidden:
            hs.append(x)
        if attn:
            outs.append(out)
        if i in mlp_layers:
            m_in[i], m_out[i] = mi, mo
    logits = None
    if logits_from is not None and stop_after is None:
        logits = model.logits(x[:, logits_from:])
    return Outputs(logits=logits, logits_from=logits_from or 0, hidden=tuple(hs), attn=tuple(outs),
                   mlp_in=m_in, mlp_out=m_out)


def stop_gradient(out: Outputs) -> Outputs:
    """The teacher's outputs are constants of the student's loss."""
    sg = jax.lax.stop_gradient
    return dataclasses.replace(out, logits=None if out.logits is None else sg(out.logits),
                               hidden=tuple(sg(h) for h in out.hidden), attn=tuple(sg(a) for a in out.attn),
                               mlp_in={k: sg(v) for k, v in out.mlp_in.items()},
                               mlp_out={k: sg(v) for k, v in out.mlp_out.items()})


__all__ = ["AttentionFn", "Outputs", "apply_probs", "exact_attention", "forward_train", "masked_attention",
           "stop_gradient"]
