"""Knorm: keep the keys with the lowest L2 norm (Devoto et al., 2024: a low key norm predicts high
attention). Also KeyDiff (keep keys far, in cosine distance, from the mean key)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.scoring import heads_first, key_norms


@dataclasses.dataclass(frozen=True, kw_only=True)
class Knorm(CachePolicy):
    """score = -||k||; evicts the largest-norm unprotected key. decode_evict defaults to True."""

    name: ClassVar[str] = "knorm"
    decode_evict: bool = True

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        return -heads_first(key_norms(ctx.k))

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return self.prefill_scores(layer, ctx)

    def new_token_score(self, layer: int, k, q_pos):
        return -key_norms(k)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDiff(CachePolicy):
    """score = -cos(k, mean key of the row's prompt, per head): distinctive keys are kept. The
    anchor is the prompt's mean key (valid tokens only). Prefill selection only: decoded tokens are
    appended (compose with a decode-time policy to evict during decoding)."""

    name: ClassVar[str] = "keydiff"

    def __post_init__(self):
        if self.decode_evict:
            raise ValueError("keydiff scores tokens only at prefill, so it cannot evict at decode time; "
                             "compose it with a decode-time policy (Composite / --decode-policy h2o)")
        super().__post_init__()

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        k = heads_first(ctx.k.astype(jnp.float32))  # [B, Hkv, S, D]
        valid = (ctx.pos >= 0)[:, None, :, None]
        anchor = jnp.sum(jnp.where(valid, k, 0.0), axis=2) / jnp.maximum(jnp.sum(valid, axis=2), 1)
        cos = jnp.einsum("bhsd,bhd->bhs", k, anchor) / (key_norms(k) * key_norms(anchor)[..., None] + 1e-6)
        return -cos
