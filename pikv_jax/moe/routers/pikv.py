"""PiKVRouter: cache-aware routing that prefers experts whose KV shard already holds the context."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.moe.routers.base import BaseRouter, per_token_features, renormalize


def affinity_from_counts(counts):
    """Shard occupancy counts [..., E] (tokens of a row held by each expert's KV shard) -> fractions."""
    counts = jnp.asarray(counts, jnp.float32)
    return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


class PiKVRouter(BaseRouter):
    """Routing biased towards the experts whose shard of the expert-sharded KV cache holds the most
    of the sequence's context (PiKV: keep computation where the cache already is, so attention and
    the expert's feed-forward run on the same device and fewer KV entries cross devices).

    Routing algorithm:
      1. logits[T, E] = x @ W_gate; probs = softmax(logits).
      2. a[T, E] = `cache_affinity` (per token [..., E] or per sequence [B, E]; counts or fractions,
         normalised to fractions), e.g. `ExpertShardedKVCache.tokens_per_shard()`.
      3. Selection scores = log(probs) + affinity_weight * a; expert_idx = top-k of the scores.
         The bias only changes *which* experts are chosen:
      4. gates = probs at the chosen experts, renormalised over the K choices.
      5. Switch load balance + z-loss as `BaseRouter`; aux["cache_locality"] = mean share of the context
         held by each token's first expert (a statistic, weight 0).
    Without `cache_affinity` the router is the base top-k router.
    """

    kind: ClassVar[str] = "pikv"
    accepts: ClassVar[tuple[str, ...]] = ("cache_affinity",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, affinity_weight: float = 2.0, **kw):
        super().__init__(hidden_size, num_experts, top_k, **kw)
        if affinity_weight < 0:
            raise ValueError(f"affinity_weight must be >= 0, got {affinity_weight}")
        self.affinity_weight = affinity_weight

    def _select(self, logits, x2, training, key, inputs):
        aff = inputs.get("cache_affinity")
        if aff is None:
            return super()._select(logits, x2, training, key, inputs)
        a = affinity_from_counts(per_token_features("cache_affinity", aff, inputs["_lead"], self.num_experts))
        probs = jax.nn.softmax(logits, axis=-1)
        scores = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1) + self.affinity_weight * a
        _, idx = jax.lax.top_k(scores, self.top_k)
        idx = idx.astype(jnp.int32)
        active = jnp.ones(idx.shape, bool)
        gates = renormalize(jnp.take_along_axis(probs, idx, axis=-1), active)
        locality = jnp.mean(jnp.take_along_axis(a, idx[:, :1], axis=-1))
        return probs, idx, gates, active, {"cache_locality": locality}
