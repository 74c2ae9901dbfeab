"""The PiKV seed's scheduling API as a thin stateful facade over the pure policies.

    manager = CacheSchedulingManager(cache_size=512, hidden_size=256, policy=SchedulingPolicy.H2O,
                                     num_kv_heads=4)
    manager.update_cache(keys, values, metadata={"queries": queries})
    keys, values = manager.get_cached_data()
    manager.get_cache_stats()   # utilisation, evictions, bytes, hit_rate, ...

Keys and values ([B, S, hidden], [S, hidden] or a model's [B, heads, S, head_dim]) are split into
`num_kv_heads` heads; every row has its own cache. An empty cache given more tokens than it holds
compresses that chunk with the policy's prefill rule; every other token takes the decode path: the
policy names a slot (evicting when full; the new token is never dropped), the token's query attends
over the cache and the policy observes it. Without `metadata["queries"]` each key stands in for its
query (repeated over the GQA group), so H2O, LRU and TOVA rank by the keys' attention, never by
slot order. Policies with no decode-time eviction of their own (Full, SnapKV, PyramidKV, KeyDiff,
Quest, AdaKV) evict the oldest non-sink token when full; Quest attends only over its selected pages,
AdaKV evicts inside each head. Memory is bounded: the cache plus a ring of the last `hit_window`
keys evicted per (row, KV head) for the hit rate; `manager_bytes` counts both.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.attention import reference
from pikv_jax.attention.reference import NEG_INF
from pikv_jax.cache.policies import AdaKV, CachePolicy, Composite, make_policy, policy_class
from pikv_jax.cache.policies.base import PrefillContext, init_policy_cache
from pikv_jax.cache.policies.duo_attention import DuoAttention
from pikv_jax.cache.policies.quest import Quest
from pikv_jax.cache.policies.streaming_llm import StreamingLLM
from pikv_jax.cache.pooled import PooledLayerCache, free_slots
from pikv_jax.cache.state import full_bf16_bytes, tree_nbytes


class SchedulingPolicy(enum.Enum):
    """Policies of the seed API (values are `make_policy` names); one member per registered policy
    except those in MODEL_ONLY."""

    NONE = "full"
    LRU = "lru"
    H2O = "h2o"
    STREAMING_LLM = "streaming_llm"
    QUEST = "quest"
    DUOATTENTION = "duo_attention"
    SNAPKV = "snapkv"
    PYRAMIDKV = "pyramidkv"
    TOVA = "tova"
    ADAKV = "adakv"
    KNORM = "knorm"
    KEYDIFF = "keydiff"
    EXPERT_KV = "expert_kv"


_EVICTS_ON_ITS_OWN = ("h2o", "lru", "tova", "knorm", "streaming_llm", "expert_kv")
# policies whose scores need the model itself (queries before RoPE and the RoPE frequencies; a
# reconstruction pass through every layer), which a standalone manager fed K/V does not have
MODEL_ONLY = ("expected_attention", "kvzip")
_BIG = np.iinfo(np.int32).max


def _oldest_non_sink(pos, n_sink: int):
    """i32[...]: slot of the oldest resident position >= n_sink along the last axis of `pos`."""
    return jnp.argmin(jnp.where(pos >= n_sink, pos, _BIG), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManagedQuest(Quest):
    """Quest (Tang et al., 2024) in a fixed-size manager: Quest's pages, bounds and page selection
    (dense_layers = 0) over a cache of at most `cache_tokens` tokens. Quest never evicts; here a full
    cache overwrites its oldest token after the first n_sink (default 4) and rebuilds the page bounds
    exactly; a first chunk larger than the cache keeps the sinks and the newest tokens."""

    cache_tokens: int
    n_sink: int = 4
    dense_layers: int = 0

    def __post_init__(self):
        if not 0 <= self.n_sink < self.cache_tokens:
            raise ValueError(f"n_sink={self.n_sink} must be in [0, cache_size={self.cache_tokens})")
        super().__post_init__()

    def prefill(self, layer: int, cache, ctx: PrefillContext, *, scores=None):
        oldest_first = StreamingLLM(n_sink=self.n_sink, budget_tokens=self.cache_tokens)
        return self._synced(oldest_first.prefill(layer, cache, ctx))

    def decode_slot(self, layer, cache, q_pos):
        cache, free, _ = super().decode_slot(layer, cache, q_pos)
        full = jnp.sum(cache.pos >= 0, axis=-1) >= self.cache_tokens
        slot = jnp.where(full, _oldest_non_sink(cache.pos, self.n_sink), free)
        return cache, slot, jnp.ones(slot.shape[:1], bool)

    def write(self, layer, cache, k, v, q_pos, slot, active):
        return self._synced(CachePolicy.write(self, layer, cache, k, v, q_pos, slot, active))

    def served(self, cache, q, q_pos):
        """bool[B, Hkv, C]: the slots of the pages Quest selects for query q (what it attends)."""
        pages, ok = self.select_pages(cache, q, q_pos)
        page_of_slot = jnp.arange(cache.capacity) // self.page_size
        chosen = jnp.any((page_of_slot[None, None, :, None] == pages[:, :, None, :]) & ok[:, :, None, :], axis=-1)
        return chosen & (cache.pos >= 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManagedAdaKV(AdaKV):
    """AdaKV (Feng et al., 2024) in a fixed-size manager: the prompt chunk is split between heads
    by AdaKV's adaptive budgets in a pool of Hkv x cache_size slots; once the pool is full, each
    head overwrites its own oldest non-sink token, so the per-head split chosen at prefill stays."""

    def decode_slot(self, layer, cache: PooledLayerCache, q_pos):
        slot, has_free = free_slots(cache)
        hp = cache.head_positions()  # [B, Hkv, P]
        slot = jnp.where(has_free, slot, _oldest_non_sink(hp, self.n_sink))
        return cache, slot, jnp.all(has_free | jnp.any(hp >= self.n_sink, axis=-1), axis=-1)


def _duo_policy(cache_size: int, *, num_kv_heads: int = 1, sink_size: int = 4, **options) -> CachePolicy:
    """The seed's DuoAttention scheduler: every head streams (sink_size sinks + the newest tokens);
    retrieval heads keep every token, which a fixed-size manager cannot promise."""
    if options.pop("pattern", None) is not None:
        raise ValueError("a fixed-size manager cannot hold retrieval heads (they keep every token); "
                         "use DuoAttention(pattern=...) in PiKVModel.generate instead")
    if not 0 <= sink_size < cache_size:
        raise ValueError(f"sink_size={sink_size} must be in [0, cache_size={cache_size})")
    return DuoAttention(pattern=((False,) * num_kv_heads,), n_sink=sink_size, window=cache_size - sink_size,
                        **options)


def manager_policy(policy: SchedulingPolicy | str | CachePolicy, cache_size: int, **options) -> CachePolicy:
    """The pure policy a manager runs: budget = cache_size and decode-time eviction always on."""
    if isinstance(policy, CachePolicy):
        return policy
    name = policy_class(policy.value if isinstance(policy, SchedulingPolicy) else str(policy)).name
    if name in MODEL_ONLY:
        raise ValueError(f"policy {name!r} scores tokens with the model's own passes, which a standalone "
                         f"manager fed keys and values does not have; use it through PiKVModel.generate "
                         f"(policy=make_policy({name!r}, ...)); manager policies: "
                         f"{', '.join(m.value for m in SchedulingPolicy)}")
    if name == "duo_attention":
        return _duo_policy(cache_size, **options)
    options.pop("num_kv_heads", None)
    if name == "quest":
        options.setdefault("token_budget", max(1, cache_size // 2))
        return ManagedQuest(cache_tokens=cache_size, **options)
    fields = {f.name for f in dataclasses.fields(policy_class(name))}
    n_sink = options.get("n_sink", 4)
    if "obs_window" in fields and "obs_window" not in options:  # a window that leaves room to choose
        options["obs_window"] = max(1, min(64, (cache_size - n_sink) // 4))
    if name == "adakv":
        return ManagedAdaKV(budget_tokens=cache_size, **options)
    if name in _EVICTS_ON_ITS_OWN:
        return make_policy(name, budget_tokens=cache_size, decode_evict=True, **options)
    decode = StreamingLLM(n_sink=n_sink, budget_tokens=cache_size, decode_evict=True)
    if name == "full":
        return decode
    prefill = make_policy(name, budget_tokens=cache_size, num_layers=1, **options)
    return Composite(prefill_policy=prefill, decode_policy=decode)


def _slot_keys(layer):
    """Keys [B, Hkv, C', D] aligned with layer.head_positions() (a pool's keys broadcast per head)."""
    if isinstance(layer, PooledLayerCache):
        return jnp.broadcast_to(layer.k[:, None], (layer.batch, layer.num_kv_heads) + layer.k.shape[1:])
    return layer.k


def _push_ghost(ghost, keys, pos, ok):
    """Appends evicted tokens to the ring: keys [B, Hkv, n, D], pos i32[B, Hkv, n], ok bool[B, Hkv, n]
    (in the order they are to be forgotten). The ring overwrites its oldest entries."""
    w = ghost["pos"].shape[-1]
    b, hk, n = pos.shape
    at = jnp.where(ok, (ghost["next"][..., None] + jnp.cumsum(ok, axis=-1) - 1) % w, w)  # w -> dropped
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None]
    return dict(k=ghost["k"].at[bi, hi, at].set(keys.astype(ghost["k"].dtype), mode="drop"),
                pos=ghost["pos"].at[bi, hi, at].set(pos, mode="drop"),
                next=(ghost["next"] + jnp.sum(ok, axis=-1, dtype=jnp.int32)) % w)


def _hit(policy, layer, ghost, q, length):
    """f32[B]: the share of q's softmax attention over the resident tokens plus the ghost ring
    (recently evicted keys) that falls on the tokens the policy serves (resident, or Quest's selected
    pages); the mean over the G query heads of each KV head, then over KV heads. q: [B, H, D]."""
    hp = layer.head_positions()
    keys = jnp.concatenate([_slot_keys(layer), ghost["k"]], axis=2)  # [B, Hkv, T, D]
    pos = jnp.concatenate([hp, ghost["pos"]], axis=2)
    b, h, d = q.shape
    hk = keys.shape[1]
    logits = jnp.einsum("bhgd,bhtd->bhgt", q.reshape(b, hk, h // hk, d).astype(jnp.float32),
                        keys.astype(jnp.float32)) * d ** -0.5
    ok = (pos >= 0)[:, :, None, :]
    p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, NEG_INF), axis=-1), 0.0).mean(axis=2)
    served = policy.served(layer, q, length) if isinstance(policy, ManagedQuest) else hp >= 0
    return jnp.mean(jnp.sum(jnp.where(served, p[..., : hp.shape[-1]], 0.0), axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("policy", "window"))
def _prefill_chunk(policy, cache_layer, keys, values, queries, *, window):
    """Prefill-compresses a first chunk: keys, values [B, S, Hkv, D]; queries [B, S, H, D]. Returns
    the layer and a ghost ring holding the newest `window` evicted tokens per (row, KV head)."""
    b, s, hk, d = keys.shape
    lengths = jnp.full((b,), s, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    mass_from = policy.prefill_mass_from(lengths)
    key_mass = None if mass_from is None else reference.chunk_attention(
        queries, keys, values, pos, pos, mass_from=mass_from, group_reduce=policy.group_reduce)[1]
    ctx = PrefillContext(q=queries, k=keys, v=values, pos=pos, lengths=lengths, key_mass=key_mass, shared={})
    layer = policy.prefill(0, cache_layer, ctx)
    if not window:
        return layer, None
    hp = layer.head_positions()
    resident = jnp.zeros((b, hk, s + 1), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None], jnp.where(hp >= 0, hp, s)].set(True)[..., :s]
    evicted = ~resident  # [B, Hkv, S]
    newer = jnp.sum(evicted, axis=-1, keepdims=True) - jnp.cumsum(evicted, axis=-1)  # evicted after each position
    take = evicted & (newer < window)
    return layer, _push_ghost(_empty_ghost(b, hk, window, d, keys.dtype), jnp.swapaxes(keys, 1, 2),
                              jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), take.shape), take)


def _empty_ghost(b, hk, window, d, dtype):
    return dict(k=jnp.zeros((b, hk, window, d), dtype), pos=jnp.full((b, hk, window), -1, jnp.int32),
                next=jnp.zeros((b, hk), jnp.int32))


@functools.partial(jax.jit, static_argnames=("policy", "with_queries"), donate_argnums=(1, 2))
def _decode_chunk(policy, cache_layer, ghost, length, keys, values, queries, importance, *, with_queries):
    """Token-by-token decode path over a chunk. keys/values [S, B, Hkv, D]; queries [S, B, H, D]
    (the caller's, or the keys standing in). Returns new (cache_layer, ghost, length) and per-step
    evictions i32[S, B] and hit rates f32[S, B] (0 unless with_queries and a ghost ring is kept)."""
    decode = policy.decode_policy if isinstance(policy, Composite) else policy
    observes = type(decode).observe is not CachePolicy.observe  # else attention is only needed for the hit

    def step(carry, x):
        layer, ghost, length = carry
        k, v, q, imp = x
        active = jnp.ones(length.shape, bool)
        old_pos, old_keys = layer.head_positions(), _slot_keys(layer)
        occupied_before = layer.resident_per_head()
        layer, slot, ok = policy.decode_slot(0, layer, length)
        layer = policy.write(0, layer, k, v, length, slot, active & ok)
        if imp is not None:
            layer = _add_importance(layer, slot, imp)
        evicted = jnp.sum(occupied_before + 1 - layer.resident_per_head(), axis=-1)
        if ghost is not None:
            gone = (old_pos >= 0) & (old_pos != layer.head_positions())
            taken, idx = jax.lax.top_k(gone.astype(jnp.int32), decode.evict_every)  # [B, Hkv, n], in slot order
            ghost = _push_ghost(ghost, jnp.take_along_axis(old_keys, idx[..., None], axis=2),
                                jnp.take_along_axis(old_pos, idx, axis=-1), taken > 0)
        if observes:
            _, mass = policy.attend(0, layer, q, length)
            layer = policy.observe(0, layer, mass, length, active)
        hit = _hit(policy, layer, ghost, q, length) if with_queries and ghost is not None else \
            jnp.zeros(length.shape, jnp.float32)
        return (layer, ghost, length + 1), (evicted, hit)

    (cache_layer, ghost, length), (evicted, hit) = jax.lax.scan(
        step, (cache_layer, ghost, length), (keys, values, queries, importance))
    return cache_layer, ghost, length, evicted, hit


def _add_importance(layer, slot, importance):
    """Adds a caller-given importance f32[B] to the score of the slot just written."""
    b, hk = slot.shape
    add = jnp.broadcast_to(importance[:, None], (b, hk))
    if layer.score.ndim == 2:  # pooled layout: score [B, P], slot indexes the pool
        return layer.replace(score=layer.score.at[jnp.arange(b)[:, None], slot].add(add))
    return layer.replace(score=layer.score.at[jnp.arange(b)[:, None], jnp.arange(hk)[None], slot].add(add))


class CacheSchedulingManager:
    """Stateful cache with a scheduling policy (see the module docstring for the semantics).

    cache_size: tokens kept per row. hidden_size: width of the keys and values given.
    policy: a SchedulingPolicy, a policy name, or a CachePolicy instance. num_kv_heads: heads the
    hidden width is split into (each head keeps its own set where the policy is per head).
    num_heads: query heads in `metadata["queries"]` (a multiple of num_kv_heads; GQA). batch_size:
    rows (default: taken from the first update). track_hit_rate: keep the ghost ring of evicted keys
    that the attention hit rate needs. hit_window: evicted tokens remembered per (row, KV head) for
    it (default cache_size). Other keyword arguments are options of the policy (e.g. n_sink,
    recent_ratio; for Quest page_size and token_budget, default cache_size // 2).
    """

    def __init__(self, cache_size: int, hidden_size: int, policy: SchedulingPolicy | str | CachePolicy =
                 SchedulingPolicy.NONE, *, num_kv_heads: int = 1, num_heads: int | None = None,
                 batch_size: int | None = None, dtype=jnp.float32, track_hit_rate: bool = True,
                 hit_window: int | None = None, **policy_options):
        hit_window = cache_size if hit_window is None else hit_window
        for name, val in (("cache_size", cache_size), ("hidden_size", hidden_size), ("hit_window", hit_window)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        if hidden_size % num_kv_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads or num_kv_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.cache_size, self.hidden_size, self.num_kv_heads = cache_size, hidden_size, num_kv_heads
        self.head_dim = hidden_size // num_kv_heads
        self.dtype, self.track_hit_rate, self.batch_size = dtype, track_hit_rate, batch_size
        self.hit_window = hit_window if track_hit_rate else 0
        self._policy_options = policy_options
        self.policy = self._build_policy(policy, policy_options)
        self.policy_switches = 0
        self._state = None
        self._reset_counters()

    def _build_policy(self, policy, options) -> CachePolicy:
        return manager_policy(policy, self.cache_size, **dict(options, num_kv_heads=self.num_kv_heads))

    def _reset_counters(self):
        self.total_updates = self.total_evictions = self._hit_steps = 0
        self._hit_sum = 0.0

    def _init_state(self, batch: int):
        self.batch_size = batch
        layer = init_policy_cache(self.policy, batch, (self.cache_size,), num_kv_heads=self.num_kv_heads,
                                  head_dim=self.head_dim, dtype=self.dtype).layers[0]
        ghost = (_empty_ghost(batch, self.num_kv_heads, self.hit_window, self.head_dim, self.dtype)
                 if self.hit_window else None)
        self._state = dict(layer=layer, ghost=ghost, length=jnp.zeros((batch,), jnp.int32))

    def _to_heads(self, x, heads: int, name: str):
        """[B, S, heads, head_dim] from [S, W], [B, S, W] or [B, h, S, W // h] (W = heads * head_dim)."""
        x = jnp.asarray(x)
        width = heads * self.head_dim
        if x.ndim == 4 and x.shape[1] * x.shape[3] == width:  # a model's per-layer [B, heads, S, head_dim]
            x = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], x.shape[2], width)
        elif x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must be [B, S, {width}], [S, {width}] or [B, heads, S, head_dim] with "
                             f"heads * head_dim = {width}; got shape {tuple(x.shape)}")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or inf")
        return x.reshape(x.shape[0], x.shape[1], heads, self.head_dim)

    def update_cache(self, keys, values, metadata: dict[str, Any] | None = None) -> None:
        """Adds tokens. keys, values: [B, S, hidden_size], [S, hidden_size] or [B, heads, S, head_dim]
        (heads * head_dim = hidden_size); metadata may hold "queries" (the same layouts with
        num_heads * head_dim channels) and "importance" [B, S] (added to the tokens' scores)."""
        metadata = dict(metadata or {})
        k = self._to_heads(keys, self.num_kv_heads, "keys")
        v = self._to_heads(values, self.num_kv_heads, "values")
        if k.shape != v.shape:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape")
        q = metadata.get("queries")
        q = None if q is None else self._to_heads(q, self.num_heads, "metadata['queries']")
        if q is not None and q.shape[:2] != k.shape[:2]:
            raise ValueError(f"metadata['queries'] has {tuple(q.shape[:2])} rows and tokens, keys {tuple(k.shape[:2])}")
        real_queries = q is not None
        if q is None:  # each key stands in for its token's query (see the module docstring)
            q = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)
        imp = metadata.get("importance")
        imp = None if imp is None else jnp.asarray(imp, jnp.float32).reshape(k.shape[:2])
        b, s = k.shape[:2]
        if self._state is None:
            self._init_state(b)
        elif b != self.batch_size:
            raise ValueError(f"batch of {b} rows, but this manager holds {self.batch_size}")
        st = self._state
        if int(jnp.max(st["length"])) == 0 and s > self.cache_size:
            st["layer"], st["ghost"] = _prefill_chunk(self.policy, st["layer"], k, v, q, window=self.hit_window)
            st["length"] = jnp.full((b,), s, jnp.int32)
            self.total_evictions += b * (s - self.cache_size)
        else:
            tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
            st["layer"], st["ghost"], st["length"], evicted, hit = _decode_chunk(
                self.policy, st["layer"], st["ghost"], st["length"], tm(k), tm(v), tm(q), tm(imp),
                with_queries=real_queries)
            self.total_evictions += int(jnp.sum(evicted)) // max(self.num_kv_heads, 1)
            if real_queries and self.hit_window:
                self._hit_sum += float(jnp.sum(hit))
                self._hit_steps += hit.size
        self.total_updates += b * s

    def get_cached_data(self):
        """Resident keys and values in position order: ([n, hidden], [n, hidden]) for a single row,
        else a list of such pairs per row. Heads with different resident sets are padded with zeros
        (see `get_cached_positions`)."""
        if self._state is None:
            empty = jnp.zeros((0, self.hidden_size), self.dtype)
            return empty, empty
        layer = self._state["layer"]
        pos = np.asarray(layer.head_positions())  # [B, Hkv, C']
        out = []
        kv = layer.dense_kv() if hasattr(layer, "dense_kv") else (layer.k, layer.v)  # [B, Hkv, C', D] each
        kv = np.stack([np.asarray(x, np.float32) for x in kv])
        for b in range(pos.shape[0]):
            order = [np.argsort(np.where(p >= 0, p, _BIG))[: int((p >= 0).sum())] for p in pos[b]]
            rows = np.zeros((2, max(len(o) for o in order), self.num_kv_heads, self.head_dim), np.float32)
            for h, o in enumerate(order):
                rows[:, : len(o), h] = kv[:, b, h, o]
            out.append(tuple(jnp.asarray(x.reshape(x.shape[0], -1)) for x in rows))
        return out[0] if len(out) == 1 else out

    def get_cached_positions(self) -> np.ndarray:
        """i32[B, Hkv, C']: resident original positions per row and head (-1 = empty)."""
        if self._state is None:
            return np.zeros((0, self.num_kv_heads, 0), np.int32)
        return np.asarray(self._state["layer"].head_positions())

    def get_cache_stats(self) -> dict[str, Any]:
        """Measured statistics.

        cache_utilization: resident entries / allocated entries (rows x heads x cache_size).
        total_evictions: tokens removed to make room (per row, summed over rows).
        hit_rate: always a number in [0, 1]; `hit_rate_kind` says which:
          "attention_mass" (some decode step had metadata["queries"], track_hit_rate on): for each
            such query, after its token is written, the share of its softmax attention that falls on
            the tokens the policy serves (resident ones; for Quest those of its selected pages), the
            softmax taken over the resident tokens plus the last `hit_window` tokens evicted from that
            (row, KV head); mean over the query heads of a KV head, then KV heads, rows and steps.
            Exact share of full attention while no (row, head) evicted more than hit_window tokens
            (`hit_rate_exact`), an upper bound after. A prefill-compressed chunk's queries don't count.
          "residency" (no such step): `residency_rate`, the fraction of the tokens seen that are
            still resident, averaged over rows and KV heads. "none": nothing seen yet (0.0).
        cache_bytes: the cache arrays; manager_bytes: every array the manager holds (cache, ring of
          evicted keys, lengths); full_cache_bytes: a bf16 cache of every token seen.
        """
        stats = {"policy": self.policy.label, "cache_size": self.cache_size, "total_updates": self.total_updates,
                 "total_evictions": self.total_evictions, "policy_switches": self.policy_switches,
                 "hit_window": self.hit_window}
        if self._state is None:
            stats.update(cache_utilization=0.0, current_size=0, hit_rate=0.0, hit_rate_kind="none",
                         residency_rate=0.0, hit_rate_steps=0, hit_rate_exact=True, cache_bytes=0,
                         manager_bytes=0, full_cache_bytes=0, tokens_seen=0)
            return stats
        layer = self._state["layer"]
        resident = np.asarray(layer.resident_per_head())  # [B, Hkv]
        seen = np.asarray(self._state["length"])
        residency = float(np.mean(resident / np.maximum(seen, 1)[:, None]))
        attention = self._hit_steps > 0
        stats.update(
            cache_utilization=float(resident.sum() / (layer.slots_per_row * resident.shape[0])),
            current_size=int(resident.max()),
            hit_rate=self._hit_sum / self._hit_steps if attention else residency,
            hit_rate_kind="attention_mass" if attention else "residency",
            residency_rate=residency,
            hit_rate_steps=self._hit_steps,
            hit_rate_exact=bool(np.all(seen[:, None] - resident <= self.hit_window)),
            cache_bytes=tree_nbytes(layer),
            manager_bytes=tree_nbytes(self._state),
            full_cache_bytes=full_bf16_bytes(seen, num_layers=1, num_kv_heads=self.num_kv_heads,
                                             head_dim=self.head_dim),
            tokens_seen=int(seen.sum()),
        )
        return stats

    def change_policy(self, policy: SchedulingPolicy | str | CachePolicy, **policy_options) -> None:
        """Switches policy; the cache is reset (scores of one policy mean nothing to another)."""
        new = self._build_policy(policy, policy_options or self._policy_options)
        if new != self.policy:
            self.policy = new
            self.policy_switches += 1
            self.reset_cache()

    def reset_cache(self) -> None:
        """Empties the cache and zeroes the counters (policy switches are kept)."""
        self._state = None
        self._reset_counters()


class H2OScheduler(CacheSchedulingManager):
    """H2O with the seed's parameters: heavy_ratio and recent_ratio split the cache between heavy
    hitters and recent tokens (the recent share is recent_ratio / (heavy_ratio + recent_ratio))."""

    def __init__(self, cache_size: int, hidden_size: int, heavy_ratio: float = 0.1, recent_ratio: float = 0.1, **kw):
        if heavy_ratio < 0 or recent_ratio < 0 or heavy_ratio + recent_ratio <= 0:
            raise ValueError(f"heavy_ratio and recent_ratio must be >= 0 with a positive sum, got "
                             f"{heavy_ratio} and {recent_ratio}")
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        super().__init__(cache_size, hidden_size, SchedulingPolicy.H2O,
                         recent_ratio=recent_ratio / (heavy_ratio + recent_ratio), **kw)


class LRUScheduler(CacheSchedulingManager):
    def __init__(self, cache_size: int, hidden_size: int, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.LRU, **kw)


class StreamingLLMScheduler(CacheSchedulingManager):
    """start_size: attention sinks kept (the seed's name for n_sink)."""

    def __init__(self, cache_size: int, hidden_size: int, start_size: int = 4, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.STREAMING_LLM, n_sink=start_size, **kw)


class QUESTScheduler(CacheSchedulingManager):
    """Quest page selection for attention (hit_rate measures the selected pages; see ManagedQuest);
    options page_size (16) and token_budget (cache_size // 2)."""

    def __init__(self, cache_size: int, hidden_size: int, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.QUEST, **kw)


class DuoAttentionScheduler(CacheSchedulingManager):
    """The seed's DuoAttention scheduler: sink_size sinks plus the most recent tokens, per head."""

    def __init__(self, cache_size: int, hidden_size: int, sink_size: int = 4, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.DUOATTENTION, sink_size=sink_size, **kw)
