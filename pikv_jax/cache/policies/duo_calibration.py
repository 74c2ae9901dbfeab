"""DuoAttention head patterns: calibration from attention statistics, and the pattern JSON file.

Calibration (training-free; the paper's learned gates by distillation come later and write the
same file): run the model over long synthetic passkey-like prompts and measure, for every layer
and KV head, the share of attention mass that queries put on keys a streaming head would not
keep, i.e. outside the first `n_sink` positions and the `window` most recent ones:

    share(l, h) = mean over queries q with pos(q) >= n_sink + window and over the G query heads
                  of KV head h of  sum_{k : n_sink <= pos(k) <= pos(q) - window} softmax(q K^T)_k

A head with a high share reaches far back (retrieval head); a low share means sinks + window
already hold its attention (streaming head). Heads are ranked by share over all layers together
and the top `retrieval_fraction` (or those with share >= `threshold`) become retrieval heads.

Pattern file (JSON, one object):

    {
      "format": "pikv-duo-pattern",       # fixed
      "version": 1,
      "method": "attention_statistics",   # or "distillation" (learned gates, later issue)
      "num_layers": L, "num_kv_heads": Hkv,
      "retrieval_heads": [[true, false, ...], ...],   # L lists of Hkv booleans, true = retrieval
      "scores": [[0.41, 0.02, ...], ...] or null,     # L x Hkv floats the pattern was binarised
                                                      # from (long-range share, or gate alpha)
      "n_sink": 64, "window": 256,        # streaming-head cache the scores refer to
      "retrieval_fraction": 0.5 or null,  # how scores were binarised: a quantile ...
      "threshold": null or 0.5,           # ... or a threshold (exactly one is non-null when
                                          #     scores come from this module)
      "metadata": {...}                   # free-form: model, prompts, lengths, seed, ...
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.attention import dispatch
from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.generate import pad_prompts
from pikv_jax.models.forward import prompt_positions

FORMAT = "pikv-duo-pattern"
VERSION = 1


# --------------------------------------------------------------------------- the pattern file


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """A DuoAttention head pattern and how it was obtained (the content of the JSON file).

    retrieval: per layer, per KV head, True = retrieval head. scores: optional per-head floats
    (higher = more retrieval-like). n_sink / window: the streaming cache the pattern was made
    for. method, retrieval_fraction, threshold, metadata: provenance (see module docstring).
    """

    retrieval: tuple[tuple[bool, ...], ...]
    n_sink: int
    window: int
    scores: tuple[tuple[float, ...], ...] | None = None
    method: str = "attention_statistics"
    retrieval_fraction: float | None = None
    threshold: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pattern(self) -> tuple[tuple[bool, ...], ...]:
        return self.retrieval

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "method": self.method,
            "num_layers": len(self.retrieval), "num_kv_heads": len(self.retrieval[0]),
            "retrieval_heads": [list(r) for r in self.retrieval],
            "scores": None if self.scores is None else [list(map(float, r)) for r in self.scores],
            "n_sink": int(self.n_sink), "window": int(self.window),
            "retrieval_fraction": self.retrieval_fraction, "threshold": self.threshold,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: dict) -> "HeadPattern":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a DuoAttention pattern: expected \"format\": \"{FORMAT}\"")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported pattern version {data.get('version')!r}; allowed: {VERSION}")
        heads = data.get("retrieval_heads")
        if not heads or not all(isinstance(r, list) and r and all(isinstance(x, bool) for x in r) for r in heads):
            raise ValueError("retrieval_heads must be a non-empty list of non-empty lists of booleans")
        if len({len(r) for r in heads}) != 1:
            raise ValueError("retrieval_heads rows must all have num_kv_heads entries")
        if data.get("num_layers", len(heads)) != len(heads) or data.get("num_kv_heads", len(heads[0])) != len(heads[0]):
            raise ValueError(f"num_layers / num_kv_heads ({data.get('num_layers')}, {data.get('num_kv_heads')}) do "
                             f"not match retrieval_heads ({len(heads)} x {len(heads[0])})")
        scores = data.get("scores")
        if scores is not None and (len(scores) != len(heads) or any(len(s) != len(heads[0]) for s in scores)):
            raise ValueError("scores must have the shape of retrieval_heads")
        return cls(retrieval=tuple(tuple(r) for r in heads), n_sink=int(data["n_sink"]), window=int(data["window"]),
                   scores=None if scores is None else tuple(tuple(float(x) for x in r) for r in scores),
                   method=str(data.get("method", "attention_statistics")),
                   retrieval_fraction=data.get("retrieval_fraction"), threshold=data.get("threshold"),
                   metadata=dict(data.get("metadata") or {}))


def save_pattern(path, pattern: HeadPattern) -> None:
    """Writes the pattern JSON (see module docstring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(pattern.to_json().items())
    lines = []
    for i, (key, val) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if key in ("retrieval_heads", "scores") and val is not None:  # one layer per line
            rows = ",\n".join("  " + json.dumps(r) for r in val)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ]{end}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(val)}{end}")
    path.write_text("{\n" + "\n".join(lines) + "\n}\n")


def load_pattern(path) -> HeadPattern:
    with open(path) as f:
        return HeadPattern.from_json(json.load(f))


def binarize(scores, *, retrieval_fraction: float | None = None, threshold: float | None = None):
    """Retrieval heads from per-head scores f32[L, Hkv] (higher = retrieval) -> tuple of tuples of bools.

    retrieval_fraction in [0, 1]: the top round(fraction * L * Hkv) heads over all layers (ties:
    lower layer, then lower head first). threshold: heads with score >= threshold. Give exactly one.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [num_layers, num_kv_heads] array, got shape {scores.shape}")
    if (retrieval_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of retrieval_fraction (share of heads kept as retrieval heads) or threshold")
    if threshold is not None:
        mask = scores >= threshold
    else:
        if not 0.0 <= retrieval_fraction <= 1.0:
            raise ValueError(f"retrieval_fraction must be in [0, 1], got {retrieval_fraction}")
        n = int(math.floor(retrieval_fraction * scores.size + 0.5))
        order = np.argsort(-scores.reshape(-1), kind="stable")
        mask = np.zeros(scores.size, bool)
        mask[order[:n]] = True
        mask = mask.reshape(scores.shape)
    return tuple(tuple(bool(x) for x in row) for row in mask)


# --------------------------------------------------------------------------- attention statistics


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
    nb = -(-t // block_q)
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
