"""The cache-policy protocol and the Full policy (no eviction), which every other policy extends.

A policy is a frozen, hashable dataclass of constants (static under jit) with pure methods that the
model's forward calls at three points of each layer:

1. `prefill(layer, cache, ctx)`: after the prompt's keys are computed, decide what the empty cache
   keeps (all of it, or a scored subset) and write it.
2. `decode_slot(layer, cache, q_pos)`: before a decoded token is written, name the slot per
   (row, KV head): a free slot, else a victim (evicting policies), else report the row full.
3. `observe(layer, cache, mass, q_pos, active)`: after attention, fold this step's per-slot
   attention mass (reduced over the GQA group) into the policy's scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.cache import ops
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True)
class PrefillContext:
    """What a policy may look at when compressing one layer's prompt (trace-time values).

    q: [B, S, H, D]; k, v: [B, S, Hkv, D]; pos: i32[B, S] (-1 = padding); lengths: i32[B];
    key_mass: f32[B, Hkv, S] or None (attention mass from the queries `prefill_mass_from` chose);
    shared: a dict that earlier layers may write into (FastV ranks tokens at layer K for layers > K).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    lengths: jax.Array
    key_mass: jax.Array | None
    shared: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """Full cache: keep every token; a row whose cache has no free slot stops generating."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False  # True when decode_slot may overwrite a resident token

    def prefill_mass_from(self, lengths: jax.Array) -> jax.Array | None:
        """Which prompt queries' attention mass the policy needs: i32[B] position threshold, or None."""
        return None

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext) -> LayerCache:
        return ops.write_prompt(cache, ctx.k, ctx.v, ctx.pos)

    def decode_slot(self, layer: int, cache: LayerCache, q_pos: jax.Array):
        """Returns slot i32[B, Hkv] and ok bool[B] (False: the row has no room for the token)."""
        slot, has_free = ops.first_free_slot(cache.pos)
        return slot, jnp.all(has_free, axis=-1)

    def observe(self, layer: int, cache: LayerCache, mass: jax.Array, q_pos: jax.Array,
                active: jax.Array) -> LayerCache:
        return cache

    def capacity_for(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        """Slots this policy needs in `layer` for a prompt of `prompt_len` plus generation."""
        return prompt_len + max_new_tokens


FullCache = CachePolicy
