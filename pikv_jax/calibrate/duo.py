"""DuoAttention calibration from attention statistics: runs the model to find its retrieval heads.

Calibration (training-free; the paper's learned gates by distillation come later and write the
same file): run the model over long synthetic passkey-like prompts and measure, for every layer
and KV head, the share of attention mass that queries put on keys a streaming head would not
keep, i.e. outside the first `n_sink` positions and the `window` most recent ones:

    share(l, h) = mean over queries q with pos(q) >= n_sink + window and over the G query heads
                  of KV head h of  sum_{k : n_sink <= pos(k) <= pos(q) - window} softmax(q K^T)_k

A head with a high share reaches far back (retrieval head); a low share means sinks + window
already hold its attention (streaming head). Heads are ranked by share over all layers together
and the top `retrieval_fraction` (or those with share >= `threshold`) become retrieval heads.

The pattern and its file format are in pikv_jax/cache/policies/duo_pattern.py.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.attention import dispatch
from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.cache.policies.duo_pattern import FORMAT, VERSION, HeadPattern, binarize, load_pattern, save_pattern
from pikv_jax.intmath import cdiv
from pikv_jax.runtime.forward import prompt_positions
from pikv_jax.runtime.generate import pad_prompts


def long_range_share(q, k, q_pos, k_pos, *, n_sink: int, window: int, sliding_window: int | None = None,
                     block_q: int = 128):
    """Attention mass outside sinks + recent window, summed over queries.

    q: [B, T, H, D]; k: [B, S, Hkv, D] (after RoPE); q_pos: i32[B, T], k_pos: i32[B, S] (-1 =
    padding). A query at p counts when p >= n_sink + window; its share is the softmax mass on keys
    at positions n_sink .. p - window, averaged over the G query heads of each KV head.
    Returns (share_sum f32[B, Hkv], counted f32[B]); share_sum / counted is the mean share.
    Queries go in blocks of `block_q` (memory O(block_q * S)).
    """
    b, t, h, d = q.shape
    hk = k.shape[2]
    nb = cdiv(t, block_q)
    pad = nb * block_q - t
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block_q, hk, h // hk, d)
    qpb = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nb, block_q)
    kp = k_pos[:, None, None, None, :]

    def block(xs):
        qx, qp = xs  # [B, bq, Hkv, G, D], [B, bq]
        logits = jnp.einsum("bthgd,bshd->bhgts", qx, k, preferred_element_type=jnp.float32) * d ** -0.5
        qpp = qp[:, None, None, :, None]
        mask = visible(qpp, kp, sliding_window)
        probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
        outside = mask & (kp >= n_sink) & (kp <= qpp - window)
        share = jnp.mean(jnp.sum(jnp.where(outside, probs, 0.0), axis=-1), axis=2)  # [B, Hkv, bq]
        counted = qp >= n_sink + window  # [B, bq]
        return jnp.sum(jnp.where(counted[:, None, :], share, 0.0), axis=-1), jnp.sum(counted, axis=-1)

    sums, counts = jax.lax.map(block, (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(qpb, 1, 0)))
    return jnp.sum(sums, axis=0), jnp.sum(counts, axis=0).astype(jnp.float32)


def _stats_impl(graphdef, n_sink, window, block_q, params, tokens, lengths):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    pos = prompt_positions(tokens, lengths)
    inv_freq = model.inv_freq()
    x = model.embed(tokens)
    sums, count = [], None
    for layer in model.layers:
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h, jnp.maximum(pos, 0), inv_freq)
        s, count = long_range_share(q, k, pos, pos, n_sink=n_sink, window=window,
                                    sliding_window=cfg.sliding_window, block_q=block_q)
        sums.append(s)
        out, _ = dispatch.chunk_attention(q, k, v, pos, pos, sliding_window=cfg.sliding_window, causal_prefix=True)
        x = x + layer.self_attn.out(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return jnp.stack(sums), count  # [L, B, Hkv], [B]


_stats = jax.jit(_stats_impl, static_argnums=(0, 1, 2, 3))


def head_statistics(model, prompts: Sequence[Sequence[int]], *, n_sink: int, window: int, batch_size: int = 4,
                    block_q: int = 128) -> np.ndarray:
    """f64[L, Hkv]: each KV head's mean long-range attention share over all counted queries of
    `prompts` (token id lists). `model`: a CausalLM or a PiKVModel."""
    if n_sink < 0 or window < 1:
        raise ValueError(f"n_sink must be >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one calibration prompt")
    if max(len(p) for p in prompts) <= n_sink + window:
        raise ValueError(f"calibration prompts must be longer than n_sink + window = {n_sink + window} tokens, "
                         f"the longest has {max(len(p) for p in prompts)}")
    graphdef, params = (model.graphdef, model.params) if hasattr(model, "graphdef") else nnx.split(model)
    tokens, lengths = pad_prompts([list(p) for p in prompts], multiple=block_q)
    total, count = 0.0, 0.0
    for i in range(0, len(prompts), batch_size):
        s, c = _stats(graphdef, n_sink, window, block_q, params, jnp.asarray(tokens[i:i + batch_size]),
                      jnp.asarray(lengths[i:i + batch_size]))
        total = total + np.asarray(s, np.float64).sum(axis=1)
        count = count + float(np.asarray(c).sum())
    return total / max(count, 1.0)


def calibrate(model, prompts: Sequence[Sequence[int]], *, n_sink: int = 64, window: int = 256,
              retrieval_fraction: float | None = 0.5, threshold: float | None = None, batch_size: int = 4,
              metadata: dict | None = None) -> HeadPattern:
    """Head pattern from attention statistics on `prompts` (see module docstring). Set
    retrieval_fraction=None to binarise by `threshold` instead."""
    scores = head_statistics(model, prompts, n_sink=n_sink, window=window, batch_size=batch_size)
    retrieval = binarize(scores, retrieval_fraction=retrieval_fraction, threshold=threshold)
    meta = dict(num_prompts=len(prompts), prompt_lengths=[len(p) for p in prompts])
    meta.update(metadata or {})
    return HeadPattern(retrieval=retrieval, n_sink=n_sink, window=window,
                       scores=tuple(tuple(float(x) for x in r) for r in scores), method="attention_statistics",
                       retrieval_fraction=retrieval_fraction, threshold=threshold, metadata=meta)


# --------------------------------------------------------------------------- synthetic prompts

_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompts(num: int, length: int, *, tokenizer=None, vocab_size: int | None = None, seed: int = 0,
                    key_len: int = 8) -> list[list[int]]:
    """`num` synthetic passkey prompts of about `length` tokens, the key at evenly spread depths.

    With a tokenizer: filler text, "The pass key is NNNNN. Remember it. NNNNN is the pass key." at
    the depth, then "What is the pass key? The pass key is". Without one (random-weight models):
    random ids in [3, vocab_size) with a random `key_len`-token key at the depth, and the key's first
    half repeated at the end (so retrieving the rest needs attention back to the key).
    """
    if num < 1 or length < 16:
        raise ValueError(f"num must be >= 1 and length >= 16, got num={num}, length={length}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        depth = (i + 0.5) / num
        if tokenizer is not None:
            key = int(rng.integers(10000, 99999))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            tail = "What is the pass key? The pass key is"
            unit = len(tokenizer.encode(_FILLER, add_bos=False))
            fixed = len(tokenizer.encode(head + needle + tail))
            reps = max(1, (length - fixed) // max(unit, 1))
            before = int(round(reps * depth))
            text = head + _FILLER * before + needle + _FILLER * (reps - before) + tail
            out.append(tokenizer.encode(text))
        else:
            if vocab_size is None or vocab_size < 4:
                raise ValueError("passkey_prompts needs a tokenizer or vocab_size >= 4")
            ids = rng.integers(3, vocab_size, length).tolist()
            key = rng.integers(3, vocab_size, key_len).tolist()
            at = int(depth * (length - 2 * key_len))
            ids[at:at + key_len] = key
            ids[length - key_len // 2:] = key[: key_len // 2]
            out.append(ids)
    return out


__all__ = ["FORMAT", "HeadPattern", "VERSION", "binarize", "calibrate", "head_statistics", "load_pattern",
           "long_range_share", "passkey_prompts", "save_pattern"]
