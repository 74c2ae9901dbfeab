"""H2O: Heavy-Hitter Oracle (Zhang et al., 2023).

A token's score is the softmax attention it has accumulated: at prefill, summed over every prompt
query that sees it; at decode, each step's attention is added. The cache keeps the heavy hitters
(highest scores) plus a recent window of `recent_ratio` of the budget, and sinks.

normalize: divide the accumulated attention by the number of queries that could have attended
  to the token (kvpress's ObservedAttention); off by default, as in the H2O paper, which favours
  old tokens that had more chances to be attended. We default to the paper.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class H2O(CachePolicy):
    """recent_ratio: share of the budget reserved for the most recent tokens (H2O's default split
    of heavy_ratio = recent_ratio gives 0.5). decode_evict defaults to True."""

    name: ClassVar[str] = "h2o"
    recent_ratio: float = 0.5
    normalize: bool = False
    decode_evict: bool = True

    def __post_init__(self):
        if not 0.0 <= self.recent_ratio < 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1), got {self.recent_ratio}")
        super().__post_init__()

    def recent_window(self, budget: int) -> int:
        return max(self.window, int(self.recent_ratio * max(budget - self.n_sink, 0)))

    def prefill_mass_from(self, lengths):
        return jnp.zeros_like(lengths)  # every prompt query

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        return self._normalized(ctx.key_mass, ctx.pos[:, None, :], (ctx.lengths - 1)[:, None, None])

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return ctx.key_mass

    def _normalized(self, mass, pos, q_pos):
        if not self.normalize:
            return mass
        return mass / jnp.maximum(q_pos - pos + 1, 1).astype(jnp.float32)

    def eviction_scores(self, layer: int, cache: LayerCache, q_pos):
        return self._normalized(cache.score, cache.pos, q_pos[:, None, None])

    def observe(self, layer: int, cache: LayerCache, mass, q_pos, active) -> LayerCache:
        return cache.replace(score=jnp.where(active[:, None, None], cache.score + mass, cache.score))
