"""TOVA: Token Omission Via Attention (Oren et al., 2024).

At each decode step, evict the token with the lowest attention from the current (last) query,
averaged over all heads of the layer, so every head of a layer keeps the same tokens. At prefill,
the last prompt query's attention ranks the prompt.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.scoring import window_probs
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVA(CachePolicy):
    name: ClassVar[str] = "tova"
    decode_evict: bool = True

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        probs, _ = window_probs(ctx, 1, "mean")  # [B, Hkv, 1, S]
        return jnp.broadcast_to(jnp.mean(probs[:, :, 0], axis=1, keepdims=True), probs[:, :, 0].shape)

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return self.prefill_scores(layer, ctx)

    def observe(self, layer: int, cache: LayerCache, mass, q_pos, active) -> LayerCache:
        # heads of a layer hold the same positions in the same slots, so a slot-wise head mean is a token mean
        head_mean = jnp.broadcast_to(jnp.mean(mass, axis=1, keepdims=True), mass.shape)
        return cache.replace(score=jnp.where(active[:, None, None], head_mean, cache.score))
