"""Calibration data for compressors that learn from a model's own keys and values (SVD and LoRA
bases, PiKVCompressor's per-layer importance). It runs the model, so it lives in the runtime; the
compressors receive it through `PiKVModel.capture_qkv` (any object with that method calibrates them).

`capture_qkv` runs the model's prefill once with a policy that keeps every prompt token and also
records the layer's queries, so each layer's post-RoPE queries, keys and values come back from the
same code path generation uses (no copy of the forward pass). `calibration_ids` gives the default
calibration text: the opening paragraphs of the shipped varied haystack (pikv_jax/data), which
the evaluation never scores (its held-out perplexity text is the end of that file).
`kvzip_layer_fractions` calibrates the layer shares of KVzip's global budget on the same text.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, init_policy_cache
from pikv_jax.cache.policies.kvzip import KVzip
from pikv_jax.compress.base import LayerQKV
from pikv_jax.runtime import forward
from pikv_jax.runtime.generate import pad_prompts

CALIBRATION_FILE = "haystack_varied.txt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CapturePolicy(CachePolicy):
    """Keeps the whole prompt and records the layer's queries in `extra["q"]`."""

    name: ClassVar[str] = "capture"

    def prefill(self, layer: int, cache, ctx: PrefillContext, *, scores=None):
        return super().prefill(layer, cache, ctx).replace(extra={"q": ctx.q})


def _model_parts(model):
    """(graphdef, params, config) of a PiKVModel (or anything with those attributes)."""
    for attr in ("graphdef", "params", "config"):
        if not hasattr(model, attr):
            raise ValueError(f"calibration needs a PiKVModel (graphdef, params, config); got {type(model).__name__}")
    return model.graphdef, model.params, model.config


def calibration_ids(model, max_tokens: int = 512, *, text: str | None = None) -> list[int]:
    """Token ids of the calibration text (the first paragraphs of the shipped varied haystack, or
    `text`), at most `max_tokens` of them; seeded random ids for a model without a tokenizer."""
    if max_tokens < 2:
        raise ValueError(f"calibration needs at least 2 tokens, got max_tokens={max_tokens}")
    if text is None:
        raw = importlib.resources.files("pikv_jax.data").joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")
        paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
        text = " ".join(" ".join(paras[: max(1, len(paras) // 3)]).split())
    if getattr(model, "tokenizer", None) is None:
        # a model without a tokenizer (random test models) calibrates on seeded random token ids
        vocab = model.config.vocab_size
        return np.random.default_rng(0).integers(min(3, vocab - 1), vocab, max_tokens).tolist()
    return model.tokenizer.encode(text)[:max_tokens]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(graphdef, policy, params, tokens, lengths, cache):
    return forward.prefill(nnx.merge(graphdef, params), tokens, lengths, cache, policy)[1]


def capture_qkv(model, prompts: Sequence[Sequence[int]] | None = None, *, max_tokens: int = 512) -> list[LayerQKV]:
    """Prefill `prompts` (token id lists; default: the calibration text) and return every layer's
    queries, keys and values."""
    graphdef, params, cfg = _model_parts(model)
    if prompts is None:
        prompts = [calibration_ids(model, max_tokens)]
    prompts = [list(map(int, p))[:max_tokens] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("calibration prompts must be non-empty token id lists")
    tokens, lengths = pad_prompts(prompts, multiple=16)  # padded: fewer distinct compiled shapes
    s = tokens.shape[1]
    policy = _CapturePolicy()
    cache = init_policy_cache(policy, len(prompts), (s,) * cfg.num_hidden_layers,
                              num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head, dtype=jnp.float32)
    out = _capture(graphdef, policy, params, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1).astype(np.int32)
    return [LayerQKV(q=np.asarray(layer.extra["q"], np.float32), k=np.asarray(layer.k, np.float32),
                     v=np.asarray(layer.v, np.float32), pos=pos) for layer in out.layers]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _kvzip_scores(graphdef, params, tokens, lengths, repeat_ids, chunk_size):
    return forward.reconstruction_scores(nnx.merge(graphdef, params), tokens, lengths, repeat_ids, chunk_size)


def kvzip_layer_fractions(model, kvzip: KVzip, budget_ratio: float, *, n_sink: int, window: int,
                          max_tokens: int = 1024) -> tuple[float, ...]:
    """Each layer's share of a global KVzip budget (mean 1): KVzip scores of the calibration text
    for every (layer, KV head, token), the sinks and recent window removed (every layer keeps
    those), ranked together; the top Hkv x L x (ceil(ratio x S) - protected) are kept, and a
    layer's share is its count over the mean count. The paper ranks per prompt; the static cache
    shapes of jit fix the split per model instead (cache/policies/kvzip.py)."""
    if not 0.0 < budget_ratio <= 1.0:
        raise ValueError(f"kvzip(budget_scope=global) needs a budget ratio in (0, 1], got {budget_ratio!r}")
    graphdef, params, _ = _model_parts(model)
    ids = calibration_ids(model, max_tokens)
    s = len(ids)
    scores = _kvzip_scores(graphdef, params, jnp.asarray([ids], jnp.int32), jnp.asarray([s], jnp.int32),
                           tuple(kvzip.repeat_prompt_ids), kvzip.chunk_size)
    stacked = np.stack([np.asarray(x[0], np.float32) for x in scores])  # [L, Hkv, S]
    return global_layer_fractions(stacked, budget_ratio, n_sink=n_sink, window=window)


def global_layer_fractions(scores: np.ndarray, budget_ratio: float, *, n_sink: int, window: int) -> tuple[float, ...]:
    """Layer shares (mean 1) of the top Hkv x L x (ceil(ratio x S) - protected) of `scores`
    f32[L, Hkv, S] ranked together, the first `n_sink` and last `window` positions left out (ties:
    lower layer, head, position first). All ones when nothing is left to choose."""
    n_layers, hk, s = scores.shape
    protected = (np.arange(s) < n_sink) | (np.arange(s) >= s - window)
    per_head = max(0, math.ceil(budget_ratio * s) - int(protected.sum()))
    total = n_layers * hk * per_head
    if total == 0:
        return (1.0,) * n_layers
    ranked = np.where(protected[None, None, :], -np.inf, np.asarray(scores, np.float64)).ravel()
    top = np.argsort(-ranked, kind="stable")[:total]
    counts = np.bincount(top // (hk * s), minlength=n_layers).astype(np.float64)
    return tuple(float(round(c / counts.mean(), 4)) for c in counts)
