"""Quest (Tang et al., 2024): query-aware page selection at decode. Non-evicting.

The cache keeps every token in the uniform layout; slots are grouped into pages of `page_size`
consecutive slots (chronological for a non-evicting cache), and each page keeps the per-channel
minimum and maximum of its keys (`extra["page_min"]`, `extra["page_max"]`: f32[B, Hkv, C/ps, D],
+inf / -inf for empty pages). At a decode step, for each query head,

    U(page) = sum_c max(q_c * min_c, q_c * max_c)   (= q+ . max + q- . min)

is an upper bound of q . k for every key k of the page. The bounds of the G query heads of a KV
head are reduced (`page_reduce`, max by default, so U stays an upper bound of every head's q . k);
each (row, KV head) then attends only over its top max(3, token_budget // page_size) non-empty
pages, always including the page of the newest token. The first `dense_layers` layers and the
prefill use full attention. Quest saves bandwidth (keys and values read per step), not memory.

Bounds are built at prefill and updated on every write (a running min / max, exact because
nothing is evicted). When another policy fills the cache (Quest as `Composite`'s decode policy),
`extra["pages_synced"]` is still False and the first decode step rebuilds them from the cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.attention import dispatch
from pikv_jax.attention.reference import GROUP_REDUCTIONS
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import LayerCache, init_layer_cache
from pikv_jax.intmath import round_up


def page_bounds(k, pos, page_size: int):
    """Per-page, per-channel key bounds of a uniform cache.

    k: [B, Hkv, C, D]; pos: i32[B, Hkv, C] (-1 = empty); C a multiple of page_size. Returns
    (page_min, page_max) f32[B, Hkv, C / page_size, D]; empty slots are ignored, empty pages get
    +inf / -inf.
    """
    b, hk, c, d = k.shape
    kp = k.astype(jnp.float32).reshape(b, hk, c // page_size, page_size, d)
    ok = (pos >= 0).reshape(b, hk, c // page_size, page_size, 1)
    return jnp.min(jnp.where(ok, kp, jnp.inf), axis=3), jnp.max(jnp.where(ok, kp, -jnp.inf), axis=3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quest(CachePolicy):
    """Query-aware sparse attention over pages of the (non-evicted) cache.

    page_size: slots per page, integer >= 1, default 16 (the paper's). Cache capacities are
      multiples of it: capacity_for and init_layer_cache round up; a cache of another capacity
      reaching the policy raises ValueError.
    token_budget: tokens attended per step; max(3, token_budget // page_size) pages are selected
      per (row, KV head) (all pages when fewer). Integer >= 1, default 1024.
    dense_layers: the first layers that keep full attention (no pages kept), integer >= 0,
      default 2 (the paper's).
    page_reduce: reduction of the page bound over a GQA group's query heads: max (default: an
      upper bound of every head's score), mean or sum (upper bounds of the mean / sum).
    group_reduce: reduction over the GQA group of the per-slot attention mass returned by attend.
    n_sink / window are not used (the newest token's page is always attended); budget_ratio /
      budget_tokens are rejected (Quest keeps every token; compose it after a prompt compressor
      with Composite(prefill_policy=..., decode_policy=Quest(...))).
    """

    name: ClassVar[str] = "quest"
    n_sink: int = 0
    page_size: int = 16
    token_budget: int = 1024
    dense_layers: int = 2
    page_reduce: str = "max"

    def __post_init__(self):
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, got {self.page_size!r}")
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget must be an integer >= 1, got {self.token_budget!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an integer >= 0, got {self.dense_layers!r}")
        if self.page_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"page_reduce={self.page_reduce!r}; allowed: {', '.join(GROUP_REDUCTIONS)}")
        if self.budget_ratio is not None or self.budget_tokens is not None:
            raise ValueError("quest keeps every token and takes no budget_ratio / budget_tokens; its attention "
                             "budget is token_budget (compose with Composite to compress the prompt too)")
        if self.decode_evict:
            raise ValueError("quest never evicts: decode_evict must be False")
        super().__post_init__()

    # ------------------------------------------------------------------ pages

    def sparse(self, layer: int) -> bool:
        """True for layers that select pages (layer >= dense_layers)."""
        return layer >= self.dense_layers

    def num_pages_selected(self, capacity: int) -> int:
        return min(max(3, self.token_budget // self.page_size), capacity // self.page_size)

    def _round_up(self, capacity: int) -> int:
        return round_up(capacity, self.page_size)

    def _check(self, cache: LayerCache):
        if cache.capacity % self.page_size:
            raise ValueError(f"quest: page_size={self.page_size} does not divide the cache capacity "
                             f"{cache.capacity}; make capacities multiples of page_size (capacity_for and "
                             "Quest.init_layer_cache round up)")

    # ------------------------------------------------------------------ layout

    def capacity_for(self, layer, prompt_len, max_new_tokens) -> int:
        return self._round_up(super().capacity_for(layer, prompt_len, max_new_tokens))

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype) -> LayerCache:
        """Uniform cache of `capacity` rounded up to a multiple of page_size, with empty page bounds."""
        capacity = self._round_up(capacity)
        extra = None
        if self.sparse(layer):
            shape = (batch, num_kv_heads, capacity // self.page_size, head_dim)
            extra = dict(page_min=jnp.full(shape, jnp.inf, jnp.float32),
                         page_max=jnp.full(shape, -jnp.inf, jnp.float32),
                         pages_synced=jnp.zeros((batch,), bool))
        return init_layer_cache(batch, num_kv_heads, capacity, head_dim, dtype, extra=extra)

    def _synced(self, cache: LayerCache) -> LayerCache:
        """Cache with page bounds rebuilt from its slots (all rows marked synced)."""
        pmin, pmax = page_bounds(cache.k, cache.pos, self.page_size)
        extra = dict(cache.extra, page_min=pmin, page_max=pmax,
                     pages_synced=jnp.ones_like(cache.extra["pages_synced"]))
        return cache.replace(extra=extra)

    # ------------------------------------------------------------------ prefill and decode

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        cache = super().prefill(layer, cache, ctx, scores=scores)
        if not self.sparse(layer):
            return cache
        self._check(cache)
        return self._synced(cache)

    def decode_slot(self, layer, cache: LayerCache, q_pos):
        if self.sparse(layer):
            self._check(cache)
            cache = jax.lax.cond(jnp.all(cache.extra["pages_synced"]), lambda c: c, self._synced, cache)
        return super().decode_slot(layer, cache, q_pos)

    def write(self, layer, cache: LayerCache, k, v, q_pos, slot, active) -> LayerCache:
        cache = super().write(layer, cache, k, v, q_pos, slot, active)
        if not self.sparse(layer):
            return cache
        self._check(cache)
        b, hk = slot.shape
        bi, hi = jnp.arange(b)[:, None], jnp.arange(hk)[None, :]
        page = jnp.where(active[:, None], slot // self.page_size, cache.capacity // self.page_size)  # -> dropped
        k32 = k.astype(cache.k.dtype).astype(jnp.float32)  # bound the key as stored
        pmin = cache.extra["page_min"].at[bi, hi, page].min(k32, mode="drop")
        pmax = cache.extra["page_max"].at[bi, hi, page].max(k32, mode="drop")
        return cache.replace(extra=dict(cache.extra, page_min=pmin, page_max=pmax))

    def select_pages(self, cache: LayerCache, q, q_pos):
        """The pages each (row, KV head) attends: (pages i32[B, Hkv, n], ok bool[B, Hkv, n]).

        q: [B, H, D] after RoPE. Top-n pages by the group-reduced bound among non-empty pages, the
        newest token's page (position q_pos) always first; ok is False for filler (empty) pages.
        """
        self._check(cache)
        b, hk, c = cache.pos.shape
        ps = self.page_size
        n_pages = c // ps
        nonempty = jnp.any(cache.pos.reshape(b, hk, n_pages, ps) >= 0, axis=-1)
        is_new = cache.pos == q_pos[:, None, None]
        newest = jnp.where(jnp.any(is_new, axis=-1), jnp.argmax(is_new, axis=-1) // ps, -1)  # [B, Hkv]
        return dispatch.quest_select_pages(q, cache.extra["page_min"], cache.extra["page_max"], nonempty, newest,
                                           self.num_pages_selected(c), page_reduce=self.page_reduce)

    def attend(self, layer, cache: LayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        """-> (out [B, H, D], mass f32[B, Hkv, C]): attention over the selected pages' slots only;
        mass is scattered back to slot shape (0 outside the selected pages)."""
        if not self.sparse(layer):
            return super().attend(layer, cache, q, q_pos, sliding_window=sliding_window)
        pages, ok = self.select_pages(cache, q, q_pos)
        b, hk, n = pages.shape
        ps = self.page_size
        slots = (pages[..., None] * ps + jnp.arange(ps)).reshape(b, hk, n * ps)
        out, mass_sel = dispatch.paged_decode_attention(q, cache, q_pos, pages, ok, ps, sliding_window=sliding_window,
                                                        group_reduce=self.group_reduce)
        mass = jnp.put_along_axis(jnp.zeros(cache.pos.shape, jnp.float32), slots, mass_sel, axis=-1, inplace=False)
        return out, mass
