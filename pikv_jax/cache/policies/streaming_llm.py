"""StreamingLLM (Xiao et al., 2024): attention sinks plus a sliding window of recent tokens.

The cache keeps the first `n_sink` positions and the most recent budget - n_sink positions; at
decode the oldest non-sink token is evicted. A token's score is its position.

reindex_positions: store keys before RoPE and rotate them at attention time with their position
  inside the cache (sinks 0..n_sink-1, then the window contiguously), as the StreamingLLM paper
  does to stay inside the trained position range. Default False: keys keep their original
  positions (kvpress semantics).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.attention import reference
from pikv_jax.attention.rope import rotate
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLM(CachePolicy):
    name: ClassVar[str] = "streaming_llm"
    decode_evict: bool = True
    reindex_positions: bool = False

    @property
    def stores_raw_keys(self) -> bool:  # type: ignore[override]
        return self.reindex_positions

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        b, s, hk, _ = ctx.k.shape
        return jnp.broadcast_to(ctx.pos[:, None, :].astype(jnp.float32), (b, hk, s))

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return self.prefill_scores(layer, ctx)

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        if self.reindex_positions:
            ctx = dataclasses.replace(ctx, k=ctx.k_raw)
        return super().prefill(layer, cache, ctx, scores=scores)

    def new_token_score(self, layer: int, k, q_pos):
        return jnp.broadcast_to(q_pos[:, None].astype(jnp.float32), k.shape[:2])

    def eviction_scores(self, layer: int, cache: LayerCache, q_pos):
        return cache.pos.astype(jnp.float32)

    def cache_positions(self, cache: LayerCache, q_pos):
        """(i32[B, Hkv, C] each slot's position inside the cache, -1 if empty; i32[B, Hkv] the query's).

        The resident set is always the sinks plus one contiguous run of positions ending at q_pos,
        so a sink keeps its position and a window token gets n_sinks + (pos - first window pos)."""
        valid = cache.pos >= 0
        n_res = jnp.sum(valid, axis=-1)  # [B, Hkv]
        n_sinks = jnp.sum(valid & (cache.pos < self.n_sink), axis=-1)
        start = q_pos[:, None] - (n_res - n_sinks) + 1
        rel = jnp.where(cache.pos < self.n_sink, cache.pos, n_sinks[..., None] + cache.pos - start[..., None])
        return jnp.where(valid, rel, -1), n_res - 1

    def attend(self, layer: int, cache: LayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        if not self.reindex_positions:
            return super().attend(layer, cache, q, q_pos, sliding_window=sliding_window)
        rel, q_rel = self.cache_positions(cache, q_pos)  # [B, Hkv, C], [B, Hkv]
        b, h, d = q.shape
        hk = cache.num_kv_heads
        k_rot = rotate(cache.k, jnp.maximum(rel, 0), inv_freq)
        q_rot = rotate(q.reshape(b, hk, h // hk, d), jnp.broadcast_to(q_rel[..., None], (b, hk, h // hk)), inv_freq)
        return reference.decode_attention(q_rot.reshape(b, h, d), k_rot, cache.v, rel, q_rel,
                                          sliding_window=sliding_window, group_reduce=self.group_reduce)
