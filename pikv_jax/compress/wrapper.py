"""Compression policies that wrap an eviction policy (`inner`), declared once.

Every compression policy in this package wraps an eviction policy: the KIVI and low-rank layouts
store the tokens the inner policy keeps their own way, and the prompt selectors (FastV, ChunkKV,
pyramid) choose prompt tokens and leave decoding to it. The two bases here hold the hooks they
hand to `inner` unchanged:
- `WrapperPolicy`: budgets, capacity and the attention mass the inner policy folds into its
  scores (`has_budget`, `evicts`, `layer_budget`, `row_budget`, `capacity_for`,
  `prefill_mass_from`, `observe`), and `prefill_uniform`, the inner policy's prefill into a
  temporary full-precision cache that a layout then stores its own way;
- `DecodeByInner`: also the decode-time choices (`recent_window`, `eviction_scores`, `has_room`,
  `decode_slot`, `new_token_score`), for wrappers whose cache slots the inner policy manages.
A subclass overrides what it owns (its layout's writes and attention, a selector's budgets).
"""

from __future__ import annotations

import dataclasses

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import LayerCache, init_layer_cache

# inner policies whose decode hooks need full-precision keys or another layout
UNSUPPORTED_INNER = ("quest", "adakv", "duo_attention", "kivi", "lowrank", "per_layer")


def check_decode_scores(inner: CachePolicy, what: str) -> None:
    """Rejects inner policies whose decode-time scores read the full-precision uniform cache."""
    if inner.name == "expected_attention" and inner.decode_evict:
        raise ValueError(f"{what} cannot wrap expected_attention with decode_evict (its decode scores read keys "
                         f"in full precision); use expected_attention at prefill, e.g. expected_attention+h2o")


def check_inner(inner: CachePolicy, what: str) -> None:
    if inner.stores_raw_keys:
        raise ValueError(f"{what} stores keys after RoPE; it cannot wrap a policy that re-indexes positions")
    check_decode_scores(inner, what)
    if inner.name in UNSUPPORTED_INNER:
        raise ValueError(f"{what} cannot wrap the {inner.name!r} policy (it needs its own cache layout); "
                         f"use an eviction policy such as h2o, snapkv, streaming_llm or tova")


def decode_owner(policy: CachePolicy) -> CachePolicy:
    """The policy whose decode-time hooks (new_token_score) apply: a Composite's decode policy."""
    return getattr(policy, "decode_policy", policy)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WrapperPolicy(CachePolicy):
    """A policy around `inner` (default Full) that hands it budgets, capacity and attention mass."""

    inner: CachePolicy = dataclasses.field(default_factory=CachePolicy)

    @property
    def has_budget(self) -> bool:
        return self.inner.has_budget

    @property
    def evicts(self) -> bool:
        return self.inner.evicts

    def layer_budget(self, layer, prompt_len):
        return self.inner.layer_budget(layer, prompt_len)

    def row_budget(self, layer, lengths, prompt_len):
        return self.inner.row_budget(layer, lengths, prompt_len)

    def capacity_for(self, layer, prompt_len, max_new_tokens):
        return self.inner.capacity_for(layer, prompt_len, max_new_tokens)

    def prefill_mass_from(self, lengths):
        return self.inner.prefill_mass_from(lengths)

    def observe(self, layer, cache, mass, q_pos, active):
        return self.inner.observe(layer, cache, mass, q_pos, active)

    def prefill_uniform(self, layer: int, cache, ctx: PrefillContext, scores, what: str) -> LayerCache:
        """The inner policy's prefill into a temporary full-precision cache [B, Hkv, K, D] holding
        the K prompt tokens it keeps (chronological, empties last); `what` names the wrapper in the
        error raised when the inner policy uses another layout."""
        s = ctx.prompt_len
        kept = s if self.inner.keeps_whole_prompt(s) else self.inner.layer_budget(layer, s)
        tmp = init_layer_cache(cache.batch, cache.num_kv_heads, kept, cache.head_dim, ctx.k.dtype)
        tmp = self.inner.prefill(layer, tmp, ctx, scores=scores)
        if not isinstance(tmp, LayerCache):
            raise ValueError(f"{what} needs a uniform cache layout; {self.inner.label} uses {type(tmp).__name__}")
        return tmp


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeByInner(WrapperPolicy):
    """A wrapper whose decode-time slot choice, eviction and new-token scores are the inner policy's."""

    def recent_window(self, budget):
        return self.inner.recent_window(budget)

    def eviction_scores(self, layer, cache, q_pos):
        return self.inner.eviction_scores(layer, cache, q_pos)

    def has_room(self, layer, cache):
        return self.inner.has_room(layer, cache)

    def decode_slot(self, layer, cache, q_pos):
        return self.inner.decode_slot(layer, cache, q_pos)

    def new_token_score(self, layer, k, q_pos):
        return decode_owner(self.inner).new_token_score(layer, k, q_pos)
