"""One entry point per attention-side operation; picks the implementation for the cache type and
the requested backend (`impl="xla" | "pallas" | "auto"`). Generation calls only these."""

from __future__ import annotations

from pikv_jax.attention import reference
from pikv_jax.cache import ops
from pikv_jax.cache.state import LayerCache


def chunk_attention(q, k, v, q_pos, k_pos, *, sliding_window=None, mass_from=None, group_reduce="mean",
                    causal_prefix=False):
    """Prefill attention; see `reference.chunk_attention`."""
    return reference.chunk_attention(q, k, v, q_pos, k_pos, sliding_window=sliding_window, mass_from=mass_from,
                                     group_reduce=group_reduce, causal_prefix=causal_prefix)


def decode_attention(q, cache: LayerCache, q_pos, *, sliding_window=None, group_reduce="mean"):
    """One decode query per row over a layer cache -> (out [B, H, D], mass f32[B, Hkv, C])."""
    return reference.decode_attention(q, cache.k, cache.v, cache.pos, q_pos, sliding_window=sliding_window,
                                      group_reduce=group_reduce)


def write_token(cache: LayerCache, k, v, pos, slot, active) -> LayerCache:
    """Writes one decoded token per row into `slot` (quantized caches encode it first)."""
    return ops.write_token(cache, k, v, pos, slot, active)
