"""Expert-sharded KV storage (PiKV) as a generation policy.

Each token's key and value are stored in the shard its router picks; a decode query attends over
every shard (exact, `top_k=None`) or only over the top-k shards its own routing picks (routed, reads
about k/G of the cache's bytes). PiKV's point: with shards placed on G devices, each device holds
about L/G tokens of a layer instead of L.

Layout: the uniform [B, Hkv, C, D] cache with its slot axis split shard-major into G shards of
Cs = C / G slots, slot s = g * Cs + j. Sharding the slot axis over a mesh axis whose size divides G
therefore gives every device whole, contiguous shards. Per-layer state in `extra`:
centroids f32[B, Hkv, G, D] (the router), load i32[B, Hkv, G] (tokens per shard), sink_slot
i32[B, Hkv, n_sink] and newest_slot i32[B, Hkv] (always attended in routed mode), spilled and
evicted i32[B, Hkv] (counters for the stats).

Router (dense models): per (row, layer, KV head), G centroids fit by `kmeans_iters` deterministic
Lloyd steps on the prompt's own keys (after RoPE, sinks left out), started from keys at evenly
spaced ranks. Why k-means rather than a seeded projection: q . c_g is the mean logit of the query
over shard g's keys, so ranking shards by it sends a query to the shards holding the keys it
attends to most (ClusterKV-style); a random projection splits keys without regard to queries.

MoE router (`router=moe`, MoE models): the layer's MoE gate, applied to the attention input hidden
state of each token (forward.py hands its logits f32[B, S, E] to prefill under
`ctx.shared[ROUTER_LOGITS]`, and the new token's f32[B, E] to decode in `extra["gate"]`), ranks the
shards: experts are grouped evenly into G shards (expert e in shard e // (E / G)), a shard scores
its best expert's logit, so the first choice is the shard of the gate's argmax expert. Every KV head
of a token follows the same gate; a decode query goes to the top-k shards of its own token's gate.

Writing, in steps:
1. prefill: the kept set is the whole prompt, or (with a budget) the top tokens by the eviction
   scorer's prefill score, sinks and the recent window protected (`select_top`, as every policy);
2. each kept token ranks the shards by the distance of its key to their centroids (kmeans) or by
   its gate's logits (moe);
3. capacity-aware placement: in round r = 0..G-1 every unplaced token asks for its r-th choice and
   each shard takes requests in position order while it has room; with total capacity >= kept
   tokens every token is placed (nothing is evicted by routing);
4. decode: the new token goes to its best-ranked shard with a free slot; when every shard is full
   (evicting policies) it replaces the lowest-scored unprotected slot of its routed shard (the next
   ranked shard when all of that one's tokens are protected). Scores are the `evict` policy's
   (h2o: accumulated attention mass; streaming_llm: position).

Attention: exact mode is plain decode attention over the whole cache. Routed mode scores each shard
by the GQA-group mean of q . c_g over non-empty shards and attends over the top-k shards plus the
sink slots and the newest token's slot only; the attention mass it returns is zero outside them.
Two ways to read them, same result: `read=gather` copies the selected shards' blocks into a small
cache of k * Cs + extras slots (one device: k/G of the bytes); `read=mask` attends over the whole
cache with every other slot masked as empty, an elementwise mask on the slot axis, so with the slot
axis split over a mesh each device attends over its own shards and only the softmax statistics
cross devices (`PiKVModel` picks it when the mesh has an `expert` axis). Not composable with other
policies or transforms.

On a mesh (runtime/sharding.py): `slot_shards` tells the sharding rules a layer cache is expert-
sharded; its slot axis (k, v, pos, score) and the per-shard router state (centroids, load) are
split over the `expert` axis, whose size must divide G, so each device holds whole shards.
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b hk s d" are not forward references)

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from pikv_jax.attention import dispatch
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, select_top
from pikv_jax.cache.policies.h2o import H2O
from pikv_jax.cache.policies.streaming_llm import StreamingLLM
from pikv_jax.cache.state import LayerCache, init_layer_cache
from pikv_jax.intmath import round_up

EVICTION_SCORERS: dict[str, type[CachePolicy]] = {"h2o": H2O, "streaming_llm": StreamingLLM}
READS = ("gather", "mask")
ROUTERS = ("kmeans", "moe")
ROUTER_LOGITS = "router_logits"  # ctx.shared key of the layer's MoE gate logits at prefill (router=moe)
# `extra` leaves of an expert_kv layer cache whose axis 2 is the shard axis G
SHARD_STATE = ("centroids", "load")
_STATE_KEYS = frozenset(SHARD_STATE + ("sink_slot", "newest_slot", "spilled", "evicted"))


def slot_shards(layer) -> int | None:
    """G when `layer` is an expert_kv layer cache (its slot axis is G shard-major shards; recognised
    by its `extra` state), else None. The sharding rules split such a cache's slots by shard."""
    if (type(layer) is LayerCache and isinstance(layer.extra, dict)
            and set(layer.extra) in (_STATE_KEYS, _STATE_KEYS | {"gate"})):
        return int(layer.extra["load"].shape[-1])
    return None


def wants_router_logits(cache) -> bool:
    """Whether a layer cache takes the MoE gate logits of the decode token (`extra["gate"]`)."""
    return isinstance(getattr(cache, "extra", None), dict) and "gate" in cache.extra


def gate_shard_scores(logits: Float[Array, "... e"], num_shards: int) -> Float[Array, "... g"]:
    """Experts grouped evenly into shards (expert e -> shard e // (E / G)); a shard's score is its
    best expert's logit."""
    e = logits.shape[-1]
    return jnp.max(logits.astype(jnp.float32).reshape(logits.shape[:-1] + (num_shards, e // num_shards)), axis=-1)


def gate_ranking(logits: Float[Array, "... e"], num_shards: int) -> Int[Array, "... g"]:
    """Shards ranked by `gate_shard_scores`, best first (ties: lower shard index)."""
    return jnp.argsort(-gate_shard_scores(logits, num_shards), axis=-1, stable=True).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- router


def shard_distances(keys: Float[Array, "b hk s d"], centroids: Float[Array, "b hk g d"]) -> Float[Array, "b hk s g"]:
    """Squared distance of each key to each centroid, up to the per-key constant ||k||^2."""
    kc = jnp.einsum("bhsd,bhgd->bhsg", keys.astype(jnp.float32), centroids)
    return jnp.sum(centroids * centroids, axis=-1)[:, :, None, :] - 2.0 * kc


def shard_ranking(keys: Float[Array, "b hk s d"], centroids: Float[Array, "b hk g d"]) -> Int[Array, "b hk s g"]:
    """Shards ranked per key, nearest centroid first (ties: lower shard index)."""
    return jnp.argsort(shard_distances(keys, centroids), axis=-1, stable=True).astype(jnp.int32)


def fit_centroids(keys: Float[Array, "b hk s d"], fit: Bool[Array, "b hk s"], num_shards: int,
                  iters: int) -> Float[Array, "b hk g d"]:
    """Deterministic k-means per (row, KV head) over the keys where `fit` is True.

    Start: the keys of ranks floor((g + 0.5) n / G) among the n fitted keys (spread over the
    prompt); then `iters` Lloyd steps (assign to the nearest centroid, move each centroid to its
    keys' mean; an empty cluster keeps its centroid).
    """
    keys = keys.astype(jnp.float32)
    g = num_shards
    n = jnp.sum(fit, axis=-1)  # [B, Hkv]
    rank = jnp.cumsum(fit, axis=-1) - 1
    target = jnp.floor((jnp.arange(g) + 0.5) * n[..., None] / g).astype(jnp.int32)  # [B, Hkv, G]
    hit = (rank[:, :, None, :] == target[..., None]) & fit[:, :, None, :]  # [B, Hkv, G, S]
    centroids = jnp.take_along_axis(keys, jnp.argmax(hit, axis=-1)[..., None], axis=2)
    for _ in range(iters):
        near = jnp.argmin(shard_distances(keys, centroids), axis=-1)  # [B, Hkv, S]
        member = ((near[..., None] == jnp.arange(g)) & fit[..., None]).astype(jnp.float32)  # [B, Hkv, S, G]
        count = jnp.sum(member, axis=2)[..., None]
        sums = jnp.einsum("bhsg,bhsd->bhgd", member, keys)
        centroids = jnp.where(count > 0, sums / jnp.maximum(count, 1.0), centroids)
    return centroids


def place_in_shards(ranking: Int[Array, "b hk s g"], keep: Bool[Array, "b hk s"],
                    shard_capacity: int) -> Int[Array, "b hk s"]:
    """Capacity-aware placement (module docstring, step 3) -> shard per token, -1 if not kept."""
    b, hk, s, g = ranking.shape
    shard = jnp.full((b, hk, s), -1, jnp.int32)
    room = jnp.full((b, hk, g), shard_capacity, jnp.int32)
    for r in range(g):
        choice = ranking[..., r]
        asks = (keep & (shard < 0))[..., None] & (choice[..., None] == jnp.arange(g))  # [B, Hkv, S, G]
        queue = jnp.cumsum(asks, axis=2) - 1  # order among this round's requests, in position order
        taken = asks & (queue < room[:, :, None, :])
        shard = jnp.where(jnp.any(taken, axis=-1), choice, shard)
        room = room - jnp.sum(taken, axis=2)
    return shard


def route_queries(q: Float[Array, "b h d"], centroids: Float[Array, "b hk g d"]) -> Float[Array, "b hk g"]:
    """Score of each shard for a decode query: q . c_g averaged over the GQA group."""
    b, h, d = q.shape
    hk = centroids.shape[1]
    qg = q.reshape(b, hk, h // hk, d).astype(jnp.float32)
    return jnp.mean(jnp.einsum("bhqd,bhgd->bhqg", qg, centroids), axis=2)


def first_true(mask: Bool[Array, "... g"], ranking: Int[Array, "... g"]) -> tuple[jax.Array, jax.Array]:
    """The best-ranked index whose `mask` is True: (index i32[...], found bool[...])."""
    in_order = jnp.take_along_axis(mask, ranking, axis=-1)
    pick = jnp.take_along_axis(ranking, jnp.argmax(in_order, axis=-1)[..., None], axis=-1)[..., 0]
    return pick.astype(jnp.int32), jnp.any(in_order, axis=-1)


def gather_routed(cache: LayerCache, selected: Int[Array, "b hk k"], extra_slots: Int[Array, "b hk e"],
                  num_shards: int) -> tuple[LayerCache, Int[Array, "b hk n"]]:
    """The selected shards' blocks plus `extra_slots` (-1 = none; skipped when inside a selected
    shard or repeated) as a small LayerCache of N = k * Cs + E slots, and the N source slots."""
    b, hk, c, d = cache.k.shape
    cs = c // num_shards
    k_sel = selected.shape[-1]

    def blocks(x):  # [B, Hkv, C, ...] -> the k selected [B, Hkv, k * Cs, ...]
        xs = x.reshape((b, hk, num_shards, cs) + x.shape[3:])
        idx = selected.reshape((b, hk, k_sel, 1) + (1,) * (x.ndim - 3))
        return jnp.take_along_axis(xs, idx, axis=2).reshape((b, hk, k_sel * cs) + x.shape[3:])

    inside = jnp.any((extra_slots // cs)[..., None] == selected[..., None, :], axis=-1)
    e = extra_slots.shape[-1]
    repeated = jnp.any((extra_slots[..., :, None] == extra_slots[..., None, :])
                       & (jnp.arange(e)[:, None] > jnp.arange(e)[None, :]), axis=-1)
    extra_ok = (extra_slots >= 0) & ~inside & ~repeated
    ex = jnp.maximum(extra_slots, 0)
    pos_ex = jnp.where(extra_ok, jnp.take_along_axis(cache.pos, ex, axis=-1), -1)
    sub = LayerCache(
        k=jnp.concatenate([blocks(cache.k), jnp.take_along_axis(cache.k, ex[..., None], axis=2)], axis=2),
        v=jnp.concatenate([blocks(cache.v), jnp.take_along_axis(cache.v, ex[..., None], axis=2)], axis=2),
        pos=jnp.concatenate([blocks(cache.pos), pos_ex], axis=2),
        score=jnp.zeros((b, hk, k_sel * cs + e), jnp.float32))
    slots = (selected[..., None] * cs + jnp.arange(cs)).reshape(b, hk, k_sel * cs)
    return sub, jnp.concatenate([slots, ex], axis=-1)


def routed_mask(capacity: int, selected: Int[Array, "b hk k"], extra_slots: Int[Array, "b hk e"],
                num_shards: int) -> Bool[Array, "b hk c"]:
    """True on the slots routed attention reads: those of the selected shards and `extra_slots`
    (-1 = none). Built from an iota over the slot axis, so it is elementwise on a split slot axis."""
    slot = jnp.arange(capacity, dtype=jnp.int32)
    in_selected = jnp.any((slot // (capacity // num_shards))[None, None, :, None] == selected[:, :, None, :], axis=-1)
    return in_selected | jnp.any(slot[None, None, :, None] == extra_slots[:, :, None, :], axis=-1)


# ---------------------------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertKV(CachePolicy):
    """Expert-sharded KV storage with a key router (module docstring).

    shards: G, the number of shards of each layer's slot axis (integer >= 1, default 4); cache
      capacities are multiples of G (capacity_for rounds up).
    top_k: shards a decode query attends over, an integer in [1, G], or None for every shard
      (exact attention, equal to the full cache when nothing is evicted). Default None.
    evict: score used to evict inside the routed shard when every shard is full and to select the
      prompt under a budget: h2o (accumulated attention) or streaming_llm (recency). Default h2o.
    kmeans_iters: Lloyd steps of the router's k-means at prefill (integer >= 0, default 8).
    read: how routed mode reads the selected shards (module docstring): gather (default; fewest
      bytes on one device) or mask (device-local when the slot axis is split over a mesh).
    router: kmeans (default: the key router) or moe (the layer's MoE gate; MoE models only, with
      num_experts a multiple of shards). num_experts: E, set by `PiKVModel.bind_policy` for moe.
    n_sink / window / budget_ratio / budget_tokens / group_reduce / decode_evict: as every policy;
      sinks are never evicted and are always attended in routed mode. evict_every must be 1.
    """

    name: ClassVar[str] = "expert_kv"
    shards: int = 4
    top_k: int | None = None
    evict: str = "h2o"
    kmeans_iters: int = 8
    read: str = "gather"
    router: str = "kmeans"
    num_experts: int | None = None
    decode_evict: bool = True

    def __post_init__(self):
        if not isinstance(self.shards, int) or isinstance(self.shards, bool) or self.shards < 1:
            raise ValueError(f"shards must be an integer >= 1, got {self.shards!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or not 1 <= self.top_k <= self.shards):
            raise ValueError(f"top_k={self.top_k!r} is outside [1, shards={self.shards}]; give an integer in "
                             f"[1, {self.shards}], or None (all) for exact attention over every shard")
        if self.evict not in EVICTION_SCORERS:
            raise ValueError(f"evict={self.evict!r} is not supported; allowed: {', '.join(EVICTION_SCORERS)}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not supported; allowed: {', '.join(ROUTERS)}")
        if self.router == "moe" and self.num_experts is not None and (
                not isinstance(self.num_experts, int) or self.num_experts < 1 or self.num_experts % self.shards):
            raise ValueError(f"expert_kv(router=moe) groups num_experts={self.num_experts!r} evenly into "
                             f"shards={self.shards}: give shards that divide the model's experts")
        if self.read not in READS:
            raise ValueError(f"read={self.read!r} is not supported; allowed: {', '.join(READS)}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an integer >= 0, got {self.kmeans_iters!r}")
        super().__post_init__()
        if self.evict_every != 1:
            raise ValueError(f"expert_kv evicts one token per step: evict_every must be 1, got {self.evict_every!r}")

    @property
    def label(self) -> str:
        router = ",router=moe" if self.router == "moe" else ""
        return f"expert_kv(shards={self.shards},top_k={self.top_k or 'all'},evict={self.evict}{router})"

    @property
    def scorer(self) -> CachePolicy:
        """The `evict` policy with this policy's budget, sinks and window: it scores tokens."""
        return EVICTION_SCORERS[self.evict](n_sink=self.n_sink, window=self.window, budget_ratio=self.budget_ratio,
                                            budget_tokens=self.budget_tokens, group_reduce=self.group_reduce,
                                            decode_evict=self.decode_evict)

    # ------------------------------------------------------------------ layout

    def capacity_for(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        if self.decode_evict and self.has_budget:
            cap = self.decode_budget(layer, prompt_len, max_new_tokens)
        else:
            cap = self.layer_budget(layer, prompt_len) + max_new_tokens
        return round_up(cap, self.shards)

    def shard_capacity(self, capacity: int) -> int:
        if capacity % self.shards:
            raise ValueError(f"expert_kv: shards={self.shards} does not divide the cache capacity {capacity}; "
                             "capacities must be multiples of shards (capacity_for rounds up)")
        return capacity // self.shards

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype) -> LayerCache:
        self.shard_capacity(capacity)
        g = self.shards
        extra = dict(centroids=jnp.zeros((batch, num_kv_heads, g, head_dim), jnp.float32),
                     load=jnp.zeros((batch, num_kv_heads, g), jnp.int32),
                     sink_slot=jnp.full((batch, num_kv_heads, self.n_sink), -1, jnp.int32),
                     newest_slot=jnp.full((batch, num_kv_heads), -1, jnp.int32),
                     spilled=jnp.zeros((batch, num_kv_heads), jnp.int32),
                     evicted=jnp.zeros((batch, num_kv_heads), jnp.int32))
        if self.router == "moe":
            if self.num_experts is None:
                raise ValueError("expert_kv(router=moe) needs num_experts: generate through PiKVModel (bind_policy "
                                 "sets it from an MoE config), or give num_experts")
            extra["gate"] = jnp.zeros((batch, self.num_experts), jnp.float32)
        return init_layer_cache(batch, num_kv_heads, capacity, head_dim, dtype, extra=extra)

    def has_room(self, layer: int, cache: LayerCache):
        if self.decode_evict:
            return jnp.ones((cache.pos.shape[0],), bool)
        return jnp.all(jnp.any(cache.pos < 0, axis=-1), axis=-1)

    # ------------------------------------------------------------------ scores (the evict policy's)

    def prefill_mass_from(self, lengths):
        return self.scorer.prefill_mass_from(lengths)

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        return self.scorer.prefill_scores(layer, ctx)

    def initial_scores(self, layer: int, ctx: PrefillContext):
        return self.scorer.initial_scores(layer, ctx)

    def recent_window(self, budget: int) -> int:
        return self.scorer.recent_window(budget)

    def eviction_scores(self, layer: int, cache: LayerCache, q_pos):
        return self.scorer.eviction_scores(layer, cache, q_pos)

    def new_token_score(self, layer: int, k, q_pos):
        return self.scorer.new_token_score(layer, k, q_pos)

    def observe(self, layer: int, cache: LayerCache, mass, q_pos, active) -> LayerCache:
        return self.scorer.observe(layer, cache, mass, q_pos, active)

    # ------------------------------------------------------------------ prefill

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        """Fits the router on the prompt's keys, then writes the kept tokens into their shards."""
        b, s, hk, _ = ctx.k.shape
        cs = self.shard_capacity(cache.capacity)
        pos_h = jnp.broadcast_to(ctx.pos[:, None, :], (b, hk, s))
        valid = pos_h >= 0
        if self.keeps_whole_prompt(s):
            keep = valid
        else:
            budget = self.layer_budget(layer, s)
            idx, ok = select_top(self.prefill_scores(layer, ctx) if scores is None else scores, ctx.pos, ctx.lengths,
                                 budget, self.row_budget(layer, ctx.lengths, s), n_sink=self.n_sink,
                                 window=self.recent_window(budget))
            keep = jnp.put_along_axis(jnp.zeros((b, hk, s), bool), idx, ok, axis=-1, inplace=False)
        if int(self.layer_budget(layer, s)) > cache.capacity:
            raise ValueError(f"expert_kv: keeping {self.layer_budget(layer, s)} prompt tokens does not fit a cache "
                             f"of capacity {cache.capacity}")
        keys = jnp.swapaxes(ctx.k, 1, 2)  # [B, Hkv, S, D]
        non_sink = valid & (pos_h >= self.n_sink)
        fit = jnp.where(jnp.any(non_sink, axis=-1, keepdims=True), non_sink, valid)
        if self.router == "moe":  # the gate's ranking, the same for every KV head of a token
            centroids = cache.extra["centroids"]
            ranking = jnp.broadcast_to(gate_ranking(ctx.shared[ROUTER_LOGITS], self.shards)[:, None],
                                       (b, hk, s, self.shards))
        else:
            centroids = fit_centroids(keys, fit, self.shards, self.kmeans_iters)
            ranking = shard_ranking(keys, centroids)
        shard = place_in_shards(ranking, keep, cs)
        member = shard[..., None] == jnp.arange(self.shards)  # [B, Hkv, S, G]
        within = jnp.take_along_axis(jnp.cumsum(member, axis=2) - 1, jnp.maximum(shard, 0)[..., None], axis=-1)[..., 0]
        slot = jnp.where(shard >= 0, shard * cs + within, cache.capacity)  # capacity -> dropped
        bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None]
        init = jnp.where(valid, self.initial_scores(layer, ctx), 0.0).astype(jnp.float32)
        vals = jnp.swapaxes(ctx.v, 1, 2)
        sink_slot = cache.extra["sink_slot"]
        if self.n_sink:
            is_sink = (shard >= 0) & (pos_h < self.n_sink)
            sink_slot = sink_slot.at[bi, hi, jnp.where(is_sink, pos_h, self.n_sink)].set(slot, mode="drop")
        last = jnp.take_along_axis(slot, (ctx.lengths - 1)[:, None, None], axis=-1)[..., 0]  # newest prompt token
        extra = dict(cache.extra, centroids=centroids, load=jnp.sum(member, axis=2).astype(jnp.int32),
                     sink_slot=sink_slot, newest_slot=jnp.where(last < cache.capacity, last, -1),
                     spilled=jnp.sum((shard >= 0) & (shard != ranking[..., 0]), axis=-1).astype(jnp.int32),
                     evicted=jnp.sum(valid & ~keep, axis=-1).astype(jnp.int32))
        return cache.replace(k=cache.k.at[bi, hi, slot].set(keys.astype(cache.k.dtype), mode="drop"),
                             v=cache.v.at[bi, hi, slot].set(vals.astype(cache.v.dtype), mode="drop"),
                             pos=cache.pos.at[bi, hi, slot].set(pos_h.astype(jnp.int32), mode="drop"),
                             score=cache.score.at[bi, hi, slot].set(init, mode="drop"), extra=extra)

    # ------------------------------------------------------------------ decode

    def decode_slot(self, layer: int, cache: LayerCache, q_pos):
        """The slot depends on the new key's route, so `write` chooses it; here only whether the row
        can take the token (a non-evicting cache with no free slot cannot)."""
        return cache, jnp.zeros(cache.pos.shape[:2], jnp.int32), self.has_room(layer, cache)

    def routed_slot(self, layer: int, cache: LayerCache, k, q_pos):
        """-> (slot, shard, first choice, evicts): each (row, KV head)'s slot for the new key
        k [B, Hkv, D] (module docstring, step 4); all i32/bool [B, Hkv]."""
        b, hk, c = cache.pos.shape
        g = self.shards
        cs = c // g
        if self.router == "moe":
            ranking = jnp.broadcast_to(gate_ranking(cache.extra["gate"], g)[:, None], (b, hk, g))
        else:
            ranking = shard_ranking(k[:, :, None, :], cache.extra["centroids"])[:, :, 0]  # [B, Hkv, G]
        # per-shard candidates first ([B, Hkv, G], shard-local when the slot axis is split by shard),
        # then the pick among shards: only G numbers per (row, KV head) cross devices
        pick = lambda x, shard: jnp.take_along_axis(x, shard[..., None], axis=-1)[..., 0]
        free = (cache.pos < 0).reshape(b, hk, g, cs)
        free_shard, has_free = first_true(jnp.any(free, axis=-1), ranking)
        free_slot = free_shard * cs + pick(jnp.argmax(free, axis=-1).astype(jnp.int32), free_shard)
        if not self.decode_evict:
            return free_slot, free_shard, ranking[..., 0], jnp.zeros_like(has_free)
        u = self._unprotected_scores(layer, cache, q_pos).reshape(b, hk, g, cs)
        victim_shard, _ = first_true(jnp.any(u < jnp.inf, axis=-1), ranking)
        victim = victim_shard * cs + pick(jnp.argmin(u, axis=-1).astype(jnp.int32), victim_shard)
        return (jnp.where(has_free, free_slot, victim), jnp.where(has_free, free_shard, victim_shard),
                ranking[..., 0], ~has_free)

    def write(self, layer: int, cache: LayerCache, k, v, q_pos, slot, active) -> LayerCache:
        """Stores the token in its routed shard (the given `slot` is ignored) and updates the counters."""
        b, hk = k.shape[:2]
        slot, shard, first, evicts = self.routed_slot(layer, cache, k, q_pos)
        on = active[:, None]
        ex = cache.extra
        grows = (on & ~evicts)[..., None] & (shard[..., None] == jnp.arange(self.shards))
        sink_slot = ex["sink_slot"]
        if self.n_sink:
            at = jnp.where(on & (q_pos < self.n_sink)[:, None], q_pos[:, None], self.n_sink)
            sink_slot = sink_slot.at[jnp.arange(b)[:, None], jnp.arange(hk)[None], at].set(slot, mode="drop")
        extra = dict(ex, load=ex["load"] + grows.astype(jnp.int32), sink_slot=sink_slot,
                     newest_slot=jnp.where(on, slot, ex["newest_slot"]),
                     spilled=ex["spilled"] + (on & (shard != first)).astype(jnp.int32),
                     evicted=ex["evicted"] + (on & evicts).astype(jnp.int32))
        return CachePolicy.write(self, layer, cache.replace(extra=extra), k, v, q_pos, slot, active)

    # ------------------------------------------------------------------ attention

    def select_shards(self, cache: LayerCache, q) -> Int[Array, "b hk k"]:
        """The top-k non-empty shards by `route_queries` (empty ones only as filler)."""
        if self.router == "moe":
            scores = jnp.broadcast_to(gate_shard_scores(cache.extra["gate"], self.shards)[:, None],
                                      cache.extra["load"].shape)
        else:
            scores = route_queries(q, cache.extra["centroids"])
        scores = jnp.where(cache.extra["load"] > 0, scores, -jnp.inf)
        return jax.lax.top_k(scores, self.top_k)[1].astype(jnp.int32)

    def attend(self, layer: int, cache: LayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        """-> (out [B, H, D], mass f32[B, Hkv, C]); routed mode reads only the selected shards, the
        sinks and the newest token, and its mass is 0 elsewhere."""
        if self.top_k is None:
            return dispatch.decode_attention(q, cache, q_pos, sliding_window=sliding_window,
                                             group_reduce=self.group_reduce)
        extra_slots = jnp.concatenate([cache.extra["sink_slot"], cache.extra["newest_slot"][..., None]], axis=-1)
        if self.read == "mask":
            keep = routed_mask(cache.pos.shape[-1], self.select_shards(cache, q), extra_slots, self.shards)
            return dispatch.decode_attention(q, cache.replace(pos=jnp.where(keep, cache.pos, -1)), q_pos,
                                             sliding_window=sliding_window, group_reduce=self.group_reduce)
        sub, slots = gather_routed(cache, self.select_shards(cache, q), extra_slots, self.shards)
        out, mass_sel = dispatch.decode_attention(q, sub, q_pos, sliding_window=sliding_window,
                                                  group_reduce=self.group_reduce)
        b, hk = slots.shape[:2]
        mass = jnp.zeros(cache.pos.shape, jnp.float32).at[
            jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None], slots].add(mass_sel)
        return out, mass

    # ------------------------------------------------------------------ statistics (host side)

    def slots_read_per_step(self, capacity: int) -> int:
        """Cache slots one decode query reads per (row, KV head)."""
        if self.top_k is None or self.read == "mask":  # mask: every slot is read (masked), each on its device
            return capacity
        return self.top_k * (capacity // self.shards) + self.n_sink + 1

    def generation_stats(self, cache, rows: int, to_host=np.asarray) -> dict:
        """Per-shard loads, spills, evictions and KV bytes read per decode step (summed over layers
        and the first `rows` rows; `full` = K and V of every token seen, as a full cache reads)."""
        load = np.stack([to_host(layer.extra["load"])[:rows] for layer in cache.layers])  # [L, B, Hkv, G]
        per_shard = load.sum(axis=(0, 1, 2))
        per_head = load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-9)
        item = cache.layers[0].k.dtype.itemsize
        hk, d = cache.layers[0].k.shape[1], cache.layers[0].k.shape[3]
        kv_slot = rows * hk * d * 2 * item  # K and V bytes of one slot of every row and KV head
        read = sum(self.slots_read_per_step(layer.capacity) for layer in cache.layers) * kv_slot
        seen = int(to_host(cache.length)[:rows].sum())
        full = seen * len(cache.layers) * hk * d * 2 * item
        return dict(
            expert_kv_shards=self.shards,
            expert_kv_top_k=self.top_k or self.shards,
            shard_tokens=[int(x) for x in per_shard],
            shard_tokens_mean_per_layer=[float(x) for x in load.sum(axis=(1, 2)).mean(axis=0)],
            shard_load_max_over_mean=float(per_shard.max() / max(per_shard.mean(), 1e-9)),
            shard_load_max_over_mean_per_head=float(per_head.mean()),
            spilled_tokens=int(sum(to_host(layer.extra["spilled"])[:rows].sum() for layer in cache.layers)),
            evicted_tokens=int(sum(to_host(layer.extra["evicted"])[:rows].sum() for layer in cache.layers)),
            kv_bytes_read_per_step=int(read),
            kv_bytes_read_per_step_all_shards=int(sum(layer.capacity for layer in cache.layers) * kv_slot),
            kv_bytes_read_per_step_full=int(full),
        )


__all__ = ["ROUTER_LOGITS", "ExpertKV", "fit_centroids", "gate_ranking", "gate_shard_scores", "gather_routed",
           "place_in_shards", "route_queries", "routed_mask", "shard_ranking", "slot_shards", "wants_router_logits"]
