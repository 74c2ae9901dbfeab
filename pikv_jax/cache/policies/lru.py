"""LRU: evict the least recently used token.

A token is "used" at a step when the attention mass it receives (reduced over the GQA group) is at
least 1 / (number of tokens the query sees), i.e. at least its share under uniform attention. A
token's score is the last position at which it was used; being written counts as a use. At prefill
the uses of the last `observe_window` prompt queries are counted. Ties (same last use) are broken
by evicting the oldest position first.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.scoring import lexicographic_argmin, window_probs
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRU(CachePolicy):
    """observe_window: prompt queries whose attention counts as use at prefill (default 64)."""

    name: ClassVar[str] = "lru"
    observe_window: int = 64
    decode_evict: bool = True

    def __post_init__(self):
        if self.observe_window < 1:
            raise ValueError(f"observe_window must be >= 1, got {self.observe_window}")
        super().__post_init__()

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        probs, q_pos = window_probs(ctx, self.observe_window, self.group_reduce)  # [B, Hkv, w, S]
        n_seen = (q_pos + 1).astype(jnp.float32)[:, None, :, None]  # causal: query at p sees p + 1 keys
        used = (probs >= 1.0 / jnp.maximum(n_seen, 1.0)) & (q_pos >= 0)[:, None, :, None]
        last_use = jnp.max(jnp.where(used, q_pos[:, None, :, None], -1), axis=2)  # [B, Hkv, S]
        written = jnp.broadcast_to(ctx.pos[:, None, :], last_use.shape)
        return jnp.maximum(last_use, written).astype(jnp.float32)

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return self.prefill_scores(layer, ctx)

    def new_token_score(self, layer: int, k, q_pos):
        return jnp.broadcast_to(q_pos[:, None].astype(jnp.float32), k.shape[:2])

    def victim(self, layer: int, cache: LayerCache, q_pos):
        scores = self._unprotected_scores(layer, cache, q_pos)
        return lexicographic_argmin(scores, cache.pos)

    def observe(self, layer: int, cache: LayerCache, mass, q_pos, active) -> LayerCache:
        n = jnp.sum(cache.pos >= 0, axis=-1, keepdims=True).astype(jnp.float32)  # [B, Hkv, 1]
        used = (mass >= 1.0 / jnp.maximum(n, 1.0)) & (cache.pos >= 0) & active[:, None, None]
        return cache.replace(score=jnp.where(used, q_pos[:, None, None].astype(jnp.float32), cache.score))
