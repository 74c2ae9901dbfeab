"""The cache-policy protocol, and `CachePolicy` itself: the Full cache (no eviction) that every
policy extends.

A policy is a frozen, hashable dataclass of constants (static under jit) with pure methods that
the model's forward calls for each layer:

prefill   `prefill(layer, cache, ctx)`: the prompt's keys are computed; choose what the empty
          cache keeps (everything, or the top-`budget` tokens by `prefill_scores`, with sinks and
          the recent window protected) and write it with the decode scorer's initial scores.
decode    `decode_slot(layer, cache, q_pos)`: name the slot for the new token per (row, KV head):
          a free slot, else (evicting policies) the lowest-scored unprotected slot;
          `write(...)`: store the token; `attend(...)`: attention over the cache, returning the
          per-slot attention mass reduced over each GQA group; `observe(...)`: fold that mass
          into the scores.

Budgets: `budget_ratio` keeps ceil(ratio * L_b) prompt tokens of a row with L_b prompt tokens,
`budget_tokens` keeps min(N, L_b); neither = keep everything. Protected tokens: the first `n_sink`
positions and the `window` most recent positions of each row are never evicted.

Short prompts under a ratio budget are kept whole: a row whose ratio budget would not exceed
n_sink + window (nothing left to choose) keeps all its tokens, so a policy set once for every
request (e.g. on `PiKVModel`) leaves one-sentence prompts alone instead of raising. A row is
short when L_b <= `whole_prompt_len` = floor((n_sink + window) / ratio). When every row of the
(padded) prompt is short the layer keeps the whole prompt; otherwise the static budget stays
ceil(ratio * S) and a short row keeps min(L_b, ceil(ratio * S)) tokens, so capacities, and the
results of the long rows, are those of the ratio alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.attention import dispatch
from pikv_jax.cache import ops
from pikv_jax.cache.state import KVCache, LayerCache, init_layer_cache


@dataclasses.dataclass(frozen=True)
class PrefillContext:
    """What a policy may look at when compressing one layer's prompt (trace-time values).

    q: [B, S, H, D]; k, v: [B, S, Hkv, D] (keys after RoPE); pos: i32[B, S] (-1 = padding);
    lengths: i32[B]; key_mass: f32[B, Hkv, S] or None (attention mass from the queries chosen by
    `prefill_mass_from`, reduced over each GQA group); shared: a dict that earlier layers may write
    into (FastV ranks tokens at layer K for the layers above it); q_raw: queries before RoPE (the
    model's forward gives them to every policy; unused ones cost nothing under jit); k_raw: keys
    before RoPE, only for policies whose `stores_raw_keys` is True; inv_freq: f32[D/2] the model's
    RoPE frequencies (Expected Attention rotates its query statistics to future positions).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    lengths: jax.Array
    key_mass: jax.Array | None
    shared: dict[str, Any]
    q_raw: jax.Array | None = None  # before RoPE
    k_raw: jax.Array | None = None  # before RoPE, only for policies with stores_raw_keys
    inv_freq: jax.Array | None = None

    @property
    def prompt_len(self) -> int:
        return self.k.shape[1]


def protected_mask(pos, q_pos, n_sink: int, window: int):
    """bool, shape of `pos`: sink positions (< n_sink) and the `window` most recent positions.

    pos: i32[B, ...] slot positions (-1 empty); q_pos: i32[B] position of the newest token of the
    row (the token being written at decode, length - 1 at prefill). A window of W protects
    positions q_pos - W + 1 .. q_pos.
    """
    qp = q_pos.reshape(q_pos.shape + (1,) * (pos.ndim - 1))
    return (pos >= 0) & ((pos < n_sink) | (pos > qp - window))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """Full cache: keeps every token; a row whose cache has no free slot stops generating.

    n_sink: first positions never evicted (attention sinks), default 4.
    window: most recent positions never evicted, default 0 (policies set their own).
    budget_ratio / budget_tokens: prompt tokens kept per row at prefill (see module docstring).
    group_reduce: how per-query-head scores are reduced over a GQA group: mean | max | sum.
    decode_evict: evict at decode time so the cache never grows past the budget; when False the
      cache keeps the prefill selection and grows by one slot per generated token.
    evict_every: evict this many tokens at once when the cache is full (1 = every step); the
      cache then holds budget + evict_every - 1 slots.
    """

    name: ClassVar[str] = "full"
    layout: ClassVar[str] = "uniform"  # cache layout of init_layer_cache: uniform | pooled | kivi | lowrank

    n_sink: int = 4
    window: int = 0
    budget_ratio: float | None = None
    budget_tokens: int | None = None
    group_reduce: str = "mean"
    decode_evict: bool = False
    evict_every: int = 1

    def __post_init__(self):
        if self.budget_ratio is not None and self.budget_tokens is not None:
            raise ValueError("give either budget_ratio or budget_tokens, not both")
        if self.budget_ratio is not None and not (0.0 < self.budget_ratio <= 1.0):
            raise ValueError(f"budget_ratio must be in (0, 1], got {self.budget_ratio}")
        if self.budget_tokens is not None and (not isinstance(self.budget_tokens, int) or self.budget_tokens < 1):
            raise ValueError(f"budget_tokens must be an integer >= 1, got {self.budget_tokens!r}")
        if self.n_sink < 0 or self.window < 0:
            raise ValueError(f"n_sink and window must be >= 0, got n_sink={self.n_sink}, window={self.window}")
        if self.budget_tokens is not None and self.budget_tokens <= self.n_sink + self.window:
            raise ValueError(f"budget_tokens={self.budget_tokens} must be larger than n_sink + window = "
                             f"{self.n_sink} + {self.window}: nothing would be left to choose")
        if self.group_reduce not in ("mean", "max", "sum"):
            raise ValueError(f"group_reduce={self.group_reduce!r}; allowed: mean, max, sum")
        if not isinstance(self.evict_every, int) or self.evict_every < 1:
            raise ValueError(f"evict_every must be an integer >= 1, got {self.evict_every!r}")

    @property
    def label(self) -> str:
        """Name shown in stats and reports."""
        return self.name

    # ------------------------------------------------------------------ budgets and capacity

    @property
    def has_budget(self) -> bool:
        return self.budget_ratio is not None or self.budget_tokens is not None

    @property
    def evicts(self) -> bool:
        """True when decode may overwrite a resident token (the cache is never 'full')."""
        return self.decode_evict

    def layer_budget(self, layer: int, prompt_len: int) -> int:
        """Static number of prompt tokens this layer keeps for a (padded) prompt of `prompt_len`."""
        if self.budget_tokens is not None:
            k = self.budget_tokens
        elif self.budget_ratio is not None:
            # every row is short: each keeps its whole prompt (module docstring)
            k = prompt_len if prompt_len <= self.whole_prompt_len else math.ceil(self.budget_ratio * prompt_len)
        else:
            return prompt_len
        base = min(k, prompt_len)
        f = self.layer_fraction(layer)
        if f == 1.0 or self.keeps_whole_prompt(prompt_len):
            return base
        w = min(self.n_sink + self.window, base)  # protected tokens: every layer keeps them all
        return min(prompt_len, w + max(1, int(round((base - w) * f))))

    def layer_fraction(self, layer: int) -> float:
        """`layer`'s share of the selectable (unprotected) budget relative to the mean over layers:
        1 = the same budget in every layer; PyramidKV and KVzip's global scope spread it unevenly,
        keeping the average, so the model's total stays the uniform one."""
        return 1.0

    @property
    def whole_prompt_len(self) -> int:
        """Longest row a ratio budget keeps whole: its ratio budget would not exceed n_sink + window,
        so there is nothing to choose (0 without a ratio budget)."""
        if self.budget_ratio is None:
            return 0
        return math.floor((self.n_sink + self.window) / self.budget_ratio + 1e-6)

    def keeps_whole_prompt(self, prompt_len: int) -> bool:
        """True when every row keeps all its prompt tokens (no budget, ratio 1, tokens >= S, or a
        ratio budget on prompts too short to compress)."""
        return (not self.has_budget or self.budget_ratio == 1.0
                or (self.budget_tokens is not None and self.budget_tokens >= prompt_len)
                or (self.budget_ratio is not None and prompt_len <= self.whole_prompt_len))

    def base_row_budget(self, lengths):
        """i32[B]: tokens each row would keep from its own prompt length, before any cap."""
        if self.budget_tokens is not None:
            return jnp.full_like(lengths, self.budget_tokens)
        if self.budget_ratio is not None:
            kept = jnp.ceil(lengths.astype(jnp.float32) * self.budget_ratio - 1e-6).astype(jnp.int32)
            return jnp.where(lengths <= self.whole_prompt_len, lengths, kept)
        return lengths

    def row_budget(self, layer: int, lengths, prompt_len: int):
        """i32[B]: tokens row b keeps in `layer` (never more than its length or the layer's slots)."""
        rows = jnp.minimum(self.base_row_budget(lengths), lengths)
        f = self.layer_fraction(layer)
        if f != 1.0:  # the unprotected part scaled by the layer's share (as in layer_budget)
            w = jnp.minimum(self.n_sink + self.window, rows)
            rows = jnp.minimum(w + jnp.maximum(1, jnp.round((rows - w) * f)).astype(jnp.int32), lengths)
        return jnp.minimum(rows, self.layer_budget(layer, prompt_len))

    def decode_budget(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        """Tokens `layer` holds under decode-time eviction: its prompt budget, except that a
        `budget_tokens` larger than the prompt lets the cache grow to it (capped at the whole
        sequence), so a budget of the whole sequence never evicts."""
        kept = self.layer_budget(layer, prompt_len)
        if self.budget_tokens is not None and self.budget_tokens > prompt_len:
            kept = max(kept, min(self.budget_tokens, prompt_len + max_new_tokens))
        return kept

    def capacity_for(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        """Slots `layer` needs for a prompt of `prompt_len` (padded) plus `max_new_tokens` tokens."""
        if self.decode_evict:
            if not self.has_budget:
                raise ValueError(f"{self.name}: decode-time eviction needs a budget (budget_ratio or budget_tokens)")
            return self.decode_budget(layer, prompt_len, max_new_tokens) + self.evict_every - 1
        return self.layer_budget(layer, prompt_len) + max_new_tokens

    # ------------------------------------------------------------------ layout

    def init_layer_cache(self, layer: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                         dtype) -> Any:
        """The empty cache of one layer (uniform [B, Hkv, C, D] unless a policy needs another layout)."""
        return init_layer_cache(batch, num_kv_heads, capacity, head_dim, dtype)

    def has_room(self, layer: int, cache: LayerCache):
        """bool[B]: the row can take one more token in this layer without evicting."""
        if self.evicts:
            return jnp.ones((cache.pos.shape[0],), bool)
        return jnp.all(jnp.any(cache.pos < 0, axis=-1), axis=-1)

    # ------------------------------------------------------------------ prefill

    def prefill_mass_from(self, lengths):
        """Which prompt queries' attention mass the attention pass accumulates: i32[B] position
        threshold (0 = all queries), or None when the policy needs no attention mass."""
        return None

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        """f32[B, Hkv, S] importance of each prompt token (higher = keep)."""
        raise NotImplementedError(f"{self.name} does not score prompt tokens")

    def initial_scores(self, layer: int, ctx: PrefillContext):
        """f32[B, Hkv, S] the decode-time score kept prompt tokens start with."""
        return jnp.zeros(ctx.pos.shape[:1] + (ctx.k.shape[2],) + ctx.pos.shape[1:], jnp.float32)

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        """Writes the kept prompt tokens. `scores` overrides `prefill_scores` (composition)."""
        s = ctx.prompt_len
        budget = self.layer_budget(layer, s)
        init = self.initial_scores(layer, ctx)
        if self.keeps_whole_prompt(s):
            return ops.write_prompt(cache, ctx.k, ctx.v, ctx.pos, score=init)
        if scores is None:
            scores = self.prefill_scores(layer, ctx)
        idx, ok = select_top(scores, ctx.pos, ctx.lengths, budget, self.row_budget(layer, ctx.lengths, s),
                             n_sink=self.n_sink, window=self.recent_window(budget))
        return ops.gather_prompt(cache, ctx.k, ctx.v, ctx.pos, idx, ok, score=init)

    # ------------------------------------------------------------------ decode

    def recent_window(self, budget: int) -> int:
        """Most recent positions protected when `budget` tokens are kept (default: `window`)."""
        return self.window

    def eviction_scores(self, layer: int, cache: LayerCache, q_pos):
        """f32[B, Hkv, C]: lower = evicted first (default: the accumulated `score`)."""
        return cache.score

    def _unprotected_scores(self, layer: int, cache: LayerCache, q_pos):
        window = self.recent_window(cache.capacity - (self.evict_every - 1))
        keep = protected_mask(cache.pos, q_pos, self.n_sink, window)
        return jnp.where(keep, jnp.inf, self.eviction_scores(layer, cache, q_pos))

    def victim(self, layer: int, cache: LayerCache, q_pos):
        """i32[B, Hkv]: the slot to overwrite in a full cache (lowest unprotected score)."""
        return jnp.argmin(self._unprotected_scores(layer, cache, q_pos), axis=-1).astype(jnp.int32)

    def decode_slot(self, layer: int, cache: LayerCache, q_pos):
        """-> (cache, slot i32[B, Hkv], ok bool[B]). A free slot if there is one; else, when
        evicting, the victim (or, with evict_every = N, the N lowest-scored unprotected slots are
        freed at once and the first of them is used)."""
        slot, has_free = ops.first_free_slot(cache.pos)
        if not self.decode_evict:
            return cache, slot, jnp.all(has_free, axis=-1)
        full = ~has_free  # [B, Hkv]
        ok = jnp.ones(slot.shape[:1], bool)
        if self.evict_every == 1:
            return cache, jnp.where(full, self.victim(layer, cache, q_pos), slot), ok
        n = min(self.evict_every, cache.capacity)
        neg, victims = jax.lax.top_k(-self._unprotected_scores(layer, cache, q_pos), n)  # [B, Hkv, n]
        chosen = full[..., None] & ((jnp.arange(n) == 0) | (neg > -jnp.inf))  # never a protected extra
        evict = jnp.put_along_axis(jnp.zeros(cache.pos.shape, bool), victims, chosen, axis=-1, inplace=False)
        cache = cache.replace(pos=jnp.where(evict, -1, cache.pos), score=jnp.where(evict, 0.0, cache.score))
        return cache, jnp.where(full, victims[..., 0].astype(jnp.int32), slot), ok

    def new_token_score(self, layer: int, k, q_pos):
        """f32[B, Hkv] score a freshly written token starts with (k: [B, Hkv, D])."""
        return jnp.zeros(k.shape[:2], jnp.float32)

    def write(self, layer: int, cache: LayerCache, k, v, q_pos, slot, active) -> LayerCache:
        cache = dispatch.write_token(cache, k, v, q_pos, slot, active)
        score = self.new_token_score(layer, k, q_pos)
        b, hk = slot.shape
        si = jnp.where(active[:, None], slot, cache.capacity)
        return cache.replace(score=cache.score.at[jnp.arange(b)[:, None], jnp.arange(hk)[None], si].set(
            score, mode="drop"))

    stores_raw_keys: ClassVar[bool] = False  # keys cached before RoPE; `attend` rotates them

    def attend(self, layer: int, cache: LayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        """One query per row -> (out [B, H, D], mass f32[B, Hkv, C]). q is after RoPE unless
        `stores_raw_keys`, in which case `inv_freq` is given to rotate q and the cached keys."""
        return dispatch.decode_attention(q, cache, q_pos, sliding_window=sliding_window,
                                         group_reduce=self.group_reduce)

    def observe(self, layer: int, cache: LayerCache, mass, q_pos, active) -> LayerCache:
        return cache


# fields through which a policy holds other policies (AdaKV's scorer, a Composite's two policies,
# a compression wrapper's inner policy)
NESTED_POLICY_FIELDS = ("scorer", "prefill_policy", "decode_policy", "inner")


def map_policies(policy: CachePolicy, fn) -> CachePolicy:
    """`policy` with `fn` applied to it and to every policy nested in it (AdaKV's scorer, a
    Composite's two policies, a wrapper's inner policy), rebuilt bottom-up."""
    changes = {}
    for attr in NESTED_POLICY_FIELDS:
        sub = getattr(policy, attr, None)
        if isinstance(sub, CachePolicy):
            new = map_policies(sub, fn)
            if new is not sub:
                changes[attr] = new
    if changes:
        policy = dataclasses.replace(policy, **changes)
    return fn(policy)


def select_top(scores, pos, lengths, budget: int, row_budget, *, n_sink: int, window: int):
    """Top-`budget` prompt indices per (row, head) with sinks and the recent window forced in.

    scores: f32[B, Hkv, S]; pos: i32[B, S]; lengths, row_budget: i32[B].
    Returns idx i32[B, Hkv, budget] and ok bool[B, Hkv, budget] (False past the row's budget or
    its valid tokens). Protected tokens rank first, padding last. A row whose budget cannot hold
    all its protected tokens (a short row under a ratio budget) keeps its sinks, then its newest
    tokens: its window shrinks to what the budget leaves after the sinks.
    """
    b, hk, s = scores.shape
    pos_h = jnp.broadcast_to(pos[:, None, :], (b, hk, s))
    sinks = jnp.minimum(jnp.minimum(n_sink, lengths), row_budget)
    win = jnp.clip(row_budget - sinks, 0, window)[:, None, None]
    newest = (pos_h >= 0) & (pos_h > (lengths - 1)[:, None, None] - win)
    protect = protected_mask(pos_h, lengths - 1, n_sink, 0) | newest
    ranked = jnp.where(protect, jnp.inf, scores.astype(jnp.float32))
    ranked = jnp.where(pos_h >= 0, ranked, -jnp.inf)
    _, idx = jax.lax.top_k(ranked, budget)
    rank = jnp.arange(budget)[None, None, :]
    ok = (rank < row_budget[:, None, None]) & (jnp.take_along_axis(pos_h, idx, axis=-1) >= 0)
    return idx.astype(jnp.int32), ok


def init_policy_cache(policy: CachePolicy, batch: int, capacities: tuple[int, ...], *, num_kv_heads: int,
                      head_dim: int, dtype) -> KVCache:
    """An empty KVCache whose layers use the policy's layout and per-layer capacities."""
    layers = tuple(policy.init_layer_cache(i, batch, num_kv_heads, c, head_dim, dtype)
                   for i, c in enumerate(capacities))
    return KVCache(layers=layers, length=jnp.zeros((batch,), jnp.int32))


FullCache = CachePolicy
