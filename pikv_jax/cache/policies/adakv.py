"""AdaKV (Feng et al., 2024): adaptive per-head budgets inside a layer, on SnapKV scores.

A uniform budget gives every KV head the same number of tokens, although some heads concentrate
their attention on a few tokens and others spread it. AdaKV keeps the layer's total budget
(Hkv x the per-head budget) but lets heads compete for it. For each row and layer:

1. Score prompt tokens with SnapKV (observation window of the last `obs_window` prompt queries,
   softmax in float32, reduced over the GQA group, 1-D pooling).
2. Protect, in every head, the sinks (first `n_sink` positions) and the observation window
   (most recent `window` positions); they count against the head's budget.
3. Safeguard: with m = row budget - protected tokens selectable per head, every head first keeps
   its own top floor(safe_fraction * m) unprotected tokens (the paper's alpha = 0.2 floor).
4. The rest of the layer's budget, Hkv * (m - safe), goes by one top-k over the scores of all
   remaining candidates of all heads together (flattened [Hkv * S]).

Each head thus keeps protected + safe + its share of the global top-k; the layer keeps exactly
Hkv x row budget tokens per row. The selection is stored in a pooled layout (`PooledLayerCache`:
P = Hkv x (budget + max_new_tokens) slots per row, each tagged with its head), so memory is the
budget, not Hkv x the largest head (plus 4 bytes per slot for the head tag: against a uniform
SnapKV cache of the same budget that is 12 vs 8 bytes of metadata per slot). Decoded tokens are
appended (one per head per step), as in the paper's Ada-SnapKV; there is no decode-time eviction.

The safeguard follows kvpress's AdaKV (a per-head top floor, then a global top-k); the authors'
repository instead blends the global counts n_h into alpha * B + (1 - alpha) * n_h. Both give
every head at least alpha of the average budget.

Head-adaptive budgets are a combinator: `scorer` replaces step 1 by any policy's prefill scores
(`adakv(expected_attention)`, `adakv(knorm)`, `adakv(snapkv)`), as kvpress's AdaKVPress wraps a
scorer press; steps 2-4 and the pooled storage are unchanged.

Not composable in `Composite` (its prefill writes the pooled layout).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, protected_mask
from pikv_jax.cache.policies.snapkv import SnapKV
from pikv_jax.cache.pooled import (
    PooledLayerCache,
    free_slots,
    gather_prompt_pooled,
    init_pooled_cache,
    pooled_decode_attention,
    write_token_pooled,
)


def _rank(score, ok):
    """Rank along the last axis: entries with `ok` by descending score (ties: lower index), then the rest."""
    order = jnp.lexsort((-score, ~ok), axis=-1)
    return jnp.argsort(order, axis=-1)


def adaptive_keep(scores, pos, lengths, row_budget, *, n_sink: int, window: int, safe_fraction: float):
    """AdaKV's selection: bool[B, Hkv, S], True for the prompt tokens each head keeps.

    scores: f32[B, Hkv, S] (higher = keep); pos: i32[B, S] (-1 = padding); lengths, row_budget:
    i32[B] (tokens per head on average for the row). Steps 2-4 of the module docstring; protected
    tokens beyond a row's budget (only for tiny budgets) are dropped newest-first, as in SnapKV.
    Ties rank the lower (head, position) first.
    """
    b, hk, s = scores.shape
    pos_h = jnp.broadcast_to(pos[:, None, :], (b, hk, s))
    valid = pos_h >= 0
    prot = protected_mask(pos_h, lengths - 1, n_sink, window)
    prot = prot & (jnp.cumsum(prot, axis=-1) <= row_budget[:, None, None])
    n_prot = jnp.sum(prot[:, 0], axis=-1).astype(jnp.int32)  # [B], the same for every head
    m = jnp.maximum(row_budget - n_prot, 0)  # selectable per head
    n_safe = jnp.floor(safe_fraction * m.astype(jnp.float32) + 1e-4).astype(jnp.int32)
    cand = valid & ~protected_mask(pos_h, lengths - 1, n_sink, window)
    sc = scores.astype(jnp.float32)

    safe = cand & (_rank(sc, cand) < n_safe[:, None, None])
    rest = cand & ~safe
    glob_rank = _rank(sc.reshape(b, hk * s), rest.reshape(b, hk * s)).reshape(b, hk, s)
    glob = rest & (glob_rank < (hk * (m - n_safe))[:, None, None])
    return prot | safe | glob


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaKV(SnapKV):
    """Ada-SnapKV: SnapKV scores, per-head budgets within each layer, pooled storage.

    budget_ratio / budget_tokens: average prompt tokens kept per KV head (see base.py); the layer
      keeps Hkv times that, shared adaptively. Neither = keep everything.
    safe_fraction: share of each head's selectable budget (budget minus sinks and window) that
      the head keeps for itself before the global top-k, in [0, 1], default 0.2 (the paper's
      alpha). 1 = uniform budgets (SnapKV in a pool); 0 = pure global top-k.
    obs_window: SnapKV's observation window, also the protected recent window, default 64.
    kernel, pooling: SnapKV's score pooling (odd kernel, default 5; "avg" or "max").
    n_sink: first positions always kept in every head, default 4.
    group_reduce: reduction of per-query-head scores over a GQA group (mean | max | sum).
    scorer: a policy whose `prefill_scores` rank the tokens instead of SnapKV's (None = SnapKV);
      only its scores are used: budgets, protection and storage are AdaKV's.
    decode_evict must stay False (decoded tokens are appended).
    """

    name: ClassVar[str] = "adakv"
    layout: ClassVar[str] = "pooled"
    safe_fraction: float = 0.2
    scorer: CachePolicy | None = None

    @property
    def label(self) -> str:
        return self.name if self.scorer is None else f"{self.name}({self.scorer.label})"

    def prefill_mass_from(self, lengths):
        return None if self.scorer is None else self.scorer.prefill_mass_from(lengths)

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        return super().prefill_scores(layer, ctx) if self.scorer is None else self.scorer.prefill_scores(layer, ctx)

    def layer_fraction(self, layer: int) -> float:
        """The scorer's layer shares (KVzip's global scope), else uniform."""
        return 1.0 if self.scorer is None else self.scorer.layer_fraction(layer)

    def __post_init__(self):
        if not 0.0 <= self.safe_fraction <= 1.0:
            raise ValueError(f"safe_fraction must be in [0, 1], got {self.safe_fraction}")
        if self.decode_evict:
            raise ValueError("decode_evict=True is not supported by adakv: it compresses the prompt and appends "
                             "decoded tokens; allowed: decode_evict=False")
        if self.scorer is not None:
            if not isinstance(self.scorer, CachePolicy) or self.scorer.layout != "uniform":
                raise ValueError(f"adakv scorer must be a policy that scores prompt tokens (snapkv, knorm, "
                                 f"expected_attention, ...), got {self.scorer!r}")
            if type(self.scorer).prefill_scores is CachePolicy.prefill_scores:
                raise ValueError(f"adakv scorer {self.scorer.name!r} does not score prompt tokens; allowed: a "
                                 f"policy with prefill scores (snapkv, knorm, keydiff, expected_attention, tova, h2o)")
        super().__post_init__()

    # ------------------------------------------------------------------ layout

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype) -> PooledLayerCache:
        """`capacity` is the average slots per head (capacity_for); the pool holds Hkv times that."""
        return init_pooled_cache(batch, num_kv_heads, num_kv_heads * capacity, head_dim, dtype)

    def has_room(self, layer, cache: PooledLayerCache):
        _, ok = free_slots(cache)
        return jnp.all(ok, axis=-1)

    # ------------------------------------------------------------------ prefill

    def prefill(self, layer: int, cache: PooledLayerCache, ctx: PrefillContext, *, scores=None) -> PooledLayerCache:
        s = ctx.prompt_len
        hk = ctx.k.shape[2]
        budget = self.layer_budget(layer, s)
        if hk * budget > cache.capacity:
            raise ValueError(f"adakv: layer {layer} keeps {budget} tokens per head x {hk} heads, more than the "
                             f"pool's {cache.capacity} slots")
        if self.keeps_whole_prompt(s):
            keep = jnp.broadcast_to(ctx.pos[:, None, :] >= 0, (ctx.k.shape[0], hk, s))
        else:
            if scores is None:
                scores = self.prefill_scores(layer, ctx)
            keep = adaptive_keep(scores, ctx.pos, ctx.lengths, self.row_budget(layer, ctx.lengths, s),
                                 n_sink=self.n_sink, window=self.recent_window(budget),
                                 safe_fraction=self.safe_fraction)
        return gather_prompt_pooled(cache, ctx.k, ctx.v, ctx.pos, keep, score=self.initial_scores(layer, ctx))

    # ------------------------------------------------------------------ decode

    def decode_slot(self, layer, cache: PooledLayerCache, q_pos):
        slot, ok = free_slots(cache)
        return cache, slot, jnp.all(ok, axis=-1)

    def write(self, layer, cache: PooledLayerCache, k, v, q_pos, slot, active) -> PooledLayerCache:
        return write_token_pooled(cache, k, v, q_pos, slot, active, score=self.new_token_score(layer, k, q_pos))

    def attend(self, layer, cache: PooledLayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        """-> (out [B, H, D], mass f32[B, P])."""
        return pooled_decode_attention(q, cache, q_pos, sliding_window=sliding_window, group_reduce=self.group_reduce)

    def observe(self, layer, cache, mass, q_pos, active):
        return cache
