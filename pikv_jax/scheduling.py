"""The PiKV seed's scheduling API as a thin stateful facade over the pure policies.

    manager = CacheSchedulingManager(cache_size=512, hidden_size=256, policy=SchedulingPolicy.H2O,
                                     num_kv_heads=4)
    manager.update_cache(keys, values, metadata={"queries": queries})   # [B, S, hidden] each
    keys, values = manager.get_cached_data()
    manager.get_cache_stats()   # utilisation, evictions, bytes, hit_rate, ...

Semantics. Keys and values of width `hidden_size` are split into `num_kv_heads` heads of
`hidden_size // num_kv_heads` channels; every batch row has its own cache. Each `update_cache`
call is processed by jitted pure functions:
- an empty cache receiving more tokens than it holds first compresses that chunk with the policy's
  prefill rule (SnapKV window scores, H2O column sums, key norms, ...), using the queries from
  `metadata["queries"]` (or the keys themselves as queries when none are given);
- every other token goes through the decode path: the policy names a slot, evicting when the cache
  is full (a full manager always evicts, it never drops the new token), the token's query (if
  given) attends over the cache and the policy observes that attention.
Policies with no decode-time eviction rule of their own (Full/NONE, SnapKV, PyramidKV, Quest,
AdaKV, KeyDiff) evict the oldest non-sink token when full, as StreamingLLM does.
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
from pikv_jax.cache.policies import CachePolicy, Composite, make_policy, policy_class
from pikv_jax.cache.policies.base import PrefillContext, init_policy_cache
from pikv_jax.cache.policies.streaming_llm import StreamingLLM
from pikv_jax.cache.state import full_bf16_bytes, init_layer_cache, tree_nbytes
from pikv_jax.cache.policies.duo_attention import DuoAttention


class SchedulingPolicy(enum.Enum):
    """Policies of the seed API (values are `make_policy` names)."""

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


_EVICTS_ON_ITS_OWN = ("h2o", "lru", "tova", "knorm", "streaming_llm")


def _duo_policy(cache_size: int, *, num_kv_heads: int = 1, sink_size: int = 4, **options) -> CachePolicy:
    """The seed's DuoAttention scheduler: every head streams (sink_size sinks + the most recent
    cache_size - sink_size tokens). Retrieval heads keep every token, which a fixed-size manager
    cannot promise; use DuoAttention in generation for them."""
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
    name = policy.value if isinstance(policy, SchedulingPolicy) else str(policy)
    cls = policy_class(name)
    if cls.name == "duo_attention":
        return _duo_policy(cache_size, **options)
    if cls.name in _EVICTS_ON_ITS_OWN:
        return make_policy(cls.name, budget_tokens=cache_size, decode_evict=True, **options)
    n_sink = options.get("n_sink", 4)
    decode = StreamingLLM(n_sink=n_sink, budget_tokens=cache_size, decode_evict=True)
    if cls.name == "full":
        return decode
    fields = {f.name for f in dataclasses.fields(cls)}
    if "obs_window" in fields and "obs_window" not in options:  # a window that leaves room to choose
        options["obs_window"] = max(1, min(64, (cache_size - n_sink) // 4))
    prefill = make_policy(cls.name, budget_tokens=cache_size, num_layers=1, **options)
    return Composite(prefill_policy=prefill, decode_policy=decode)


@functools.partial(jax.jit, static_argnames=("policy",))
def _prefill_chunk(policy, cache_layer, keys, values, queries, lengths):
    """Prefill-compresses a first chunk keys, values: [B, S, Hkv, D]; queries [B, S, H, D]."""
    pos = jnp.where(jnp.arange(keys.shape[1])[None] < lengths[:, None], jnp.arange(keys.shape[1])[None], -1)
    mass_from = policy.prefill_mass_from(lengths)
    key_mass = None
    if mass_from is not None:
        _, key_mass = reference.chunk_attention(queries, keys, values, pos, pos, mass_from=mass_from,
                                                group_reduce=policy.group_reduce)
    ctx = PrefillContext(q=queries, k=keys, v=values, pos=pos.astype(jnp.int32), lengths=lengths,
                         key_mass=key_mass, shared={})
    return policy.prefill(0, cache_layer, ctx)


@functools.partial(jax.jit, static_argnames=("policy", "with_queries"), donate_argnums=(1, 2))
def _decode_chunk(policy, cache_layer, shadow, length, keys, values, queries, importance, *, with_queries):
    """Token-by-token decode path over a chunk. keys/values [S, B, Hkv, D]; queries [S, B, H, D].

    Returns new (cache_layer, shadow, length) and per-step stats: evictions i32[S, B] and the
    share of full-cache attention on resident tokens f32[S, B] (hit rate; 0 without queries).
    """

    def step(carry, x):
        layer, shadow, length = carry
        k, v, q, imp = x
        active = jnp.ones(length.shape, bool)
        occupied_before = layer.resident_per_head()
        layer, slot, ok = policy.decode_slot(0, layer, length)
        layer = policy.write(0, layer, k, v, length, slot, active & ok)
        if imp is not None:
            layer = _add_importance(layer, slot, imp)
        evicted = jnp.sum(occupied_before + 1 - layer.resident_per_head(), axis=-1)
        shadow = shadow.replace(
            k=_write_at(shadow.k, k, length),
            v=_write_at(shadow.v, v, length),
            pos=_write_at(shadow.pos, jnp.broadcast_to(length[:, None], k.shape[:2]), length))
        hit = jnp.zeros(length.shape, jnp.float32)
        if with_queries:
            _, mass = policy.attend(0, layer, q, length)
            layer = policy.observe(0, layer, mass, length, active)
            _, full_mass = reference.decode_attention(q, shadow.k, shadow.v, shadow.pos, length)  # [B, Hkv, T]
            resident = _resident_mask(layer.head_positions(), shadow.pos.shape[-1])
            hit = jnp.mean(jnp.sum(jnp.where(resident, full_mass, 0.0), axis=-1), axis=-1)
        return (layer, shadow, length + 1), (evicted, hit)

    (cache_layer, shadow, length), (evicted, hit) = jax.lax.scan(
        step, (cache_layer, shadow, length), (keys, values, queries, importance))
    return cache_layer, shadow, length, evicted, hit


def _write_at(buf, x, length):
    """buf [B, Hkv, T, ...] <- x [B, Hkv, ...] at slot length[b] (the shadow keeps slot == position)."""
    b, hk = buf.shape[:2]
    return buf.at[jnp.arange(b)[:, None], jnp.arange(hk)[None], length[:, None]].set(x.astype(buf.dtype))


def _resident_mask(head_positions, total: int):
    """bool[B, Hkv, total]: position p is resident for (row, head)."""
    b, hk, c = head_positions.shape
    idx = jnp.where(head_positions >= 0, head_positions, total)
    return jnp.zeros((b, hk, total), bool).at[jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None],
                                              idx].set(True, mode="drop")


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
    rows (default: taken from the first update). track_hit_rate: keep a shadow full cache to measure
    `hit_rate`. Other keyword arguments are options of the policy (e.g. n_sink, recent_ratio).
    """

    def __init__(self, cache_size: int, hidden_size: int, policy: SchedulingPolicy | str | CachePolicy =
                 SchedulingPolicy.NONE, *, num_kv_heads: int = 1, num_heads: int | None = None,
                 batch_size: int | None = None, dtype=jnp.float32, track_hit_rate: bool = True, **policy_options):
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be an integer >= 1, got {cache_size!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        if hidden_size % num_kv_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads or num_kv_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.cache_size, self.hidden_size, self.num_kv_heads = cache_size, hidden_size, num_kv_heads
        self.head_dim = hidden_size // num_kv_heads
        self.dtype = dtype
        self.track_hit_rate = track_hit_rate
        self._policy_options = policy_options
        self._policy_arg = policy
        if policy_class(policy.value if isinstance(policy, SchedulingPolicy) else getattr(policy, "name", str(policy))
                        ).name == "duo_attention" and not isinstance(policy, CachePolicy):
            policy_options = dict(policy_options, num_kv_heads=num_kv_heads)
        self.policy = manager_policy(policy, cache_size, **policy_options)
        self.batch_size = batch_size
        self.policy_switches = 0
        self._state = None
        self._reset_counters()

    # ------------------------------------------------------------------ state

    def _reset_counters(self):
        self.total_updates = 0
        self.total_evictions = 0
        self._hit_sum = 0.0
        self._hit_steps = 0

    def _init_state(self, batch: int):
        self.batch_size = batch
        layer = init_policy_cache(self.policy, batch, (self.cache_size,), num_kv_heads=self.num_kv_heads,
                                  head_dim=self.head_dim, dtype=self.dtype).layers[0]
        shadow = init_layer_cache(batch, self.num_kv_heads, max(2 * self.cache_size, 16), self.head_dim, self.dtype)
        self._state = dict(layer=layer, shadow=shadow, length=jnp.zeros((batch,), jnp.int32))

    def _grow_shadow(self, needed: int):
        shadow = self._state["shadow"]
        if needed <= shadow.capacity:
            return
        new_cap = max(needed, 2 * shadow.capacity)
        grown = init_layer_cache(shadow.batch, shadow.num_kv_heads, new_cap, shadow.head_dim, shadow.k.dtype)
        upd = jax.lax.dynamic_update_slice
        self._state["shadow"] = grown.replace(k=upd(grown.k, shadow.k, (0, 0, 0, 0)),
                                              v=upd(grown.v, shadow.v, (0, 0, 0, 0)),
                                              pos=upd(grown.pos, shadow.pos, (0, 0, 0)))

    def _split(self, x, heads: int, name: str):
        x = jnp.asarray(x)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[-1] % heads:
            raise ValueError(f"{name} must be [B, S, {heads} * head_dim] or [S, ...], got shape {tuple(x.shape)}")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or inf")
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[-1] // heads)

    def update_cache(self, keys, values, metadata: dict[str, Any] | None = None) -> None:
        """Adds tokens. keys, values: [B, S, hidden_size] (or [S, hidden_size]); metadata may hold
        "queries" [B, S, num_heads * head_dim] and "importance" [B, S] (added to the tokens' scores)."""
        metadata = dict(metadata or {})
        k = self._split(keys, self.num_kv_heads, "keys")
        v = self._split(values, self.num_kv_heads, "values")
        if k.shape != v.shape:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape")
        if k.shape[-1] != self.head_dim:
            raise ValueError(f"keys have width {k.shape[-1] * self.num_kv_heads}, expected hidden_size={self.hidden_size}")
        q = metadata.get("queries")
        q = None if q is None else self._split(q, self.num_heads, "metadata['queries']")
        if q is not None and (q.shape[:2] != k.shape[:2] or q.shape[-1] != self.head_dim):
            raise ValueError(f"metadata['queries'] must be [B, S, {self.num_heads * self.head_dim}] matching keys")
        imp = metadata.get("importance")
        if imp is not None:
            imp = jnp.asarray(imp, jnp.float32).reshape(k.shape[:2])
        b, s = k.shape[:2]
        if self._state is None:
            self._init_state(b)
        elif b != self.batch_size:
            raise ValueError(f"batch of {b} rows, but this manager holds {self.batch_size}")
        start = 0
        st = self._state
        if int(jnp.max(st["length"])) == 0 and s > self.cache_size:
            queries = q if q is not None else jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)
            lengths = jnp.full((b,), s, jnp.int32)
            st["layer"] = _prefill_chunk(self.policy, st["layer"], k, v, queries, lengths)
            self._grow_shadow(s)
            sh = st["shadow"]
            st["shadow"] = sh.replace(k=sh.k.at[:, :, :s].set(jnp.swapaxes(k, 1, 2).astype(sh.k.dtype)),
                                      v=sh.v.at[:, :, :s].set(jnp.swapaxes(v, 1, 2).astype(sh.v.dtype)),
                                      pos=sh.pos.at[:, :, :s].set(jnp.arange(s, dtype=jnp.int32)))
            st["length"] = lengths
            self.total_evictions += b * (s - self.cache_size)
            start = s
        if start < s:
            self._grow_shadow(int(jnp.max(st["length"])) + s - start)
            sl = slice(start, s)
            tm = lambda x: None if x is None else jnp.moveaxis(x[:, sl], 1, 0)
            qs = tm(q) if q is not None else jnp.zeros((s - start, b, self.num_heads, self.head_dim), k.dtype)
            st["layer"], st["shadow"], st["length"], evicted, hit = _decode_chunk(
                self.policy, st["layer"], st["shadow"], st["length"], tm(k), tm(v), qs, tm(imp) if imp is not None
                else None, with_queries=q is not None)
            self.total_evictions += int(jnp.sum(evicted)) // max(self.num_kv_heads, 1)
            if q is not None and self.track_hit_rate:
                self._hit_sum += float(jnp.sum(hit))
                self._hit_steps += hit.size
        self.total_updates += b * s

    # ------------------------------------------------------------------ reading

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
        keys, values = self._dense_kv(layer)
        for b in range(pos.shape[0]):
            order = [np.argsort(np.where(pos[b, h] >= 0, pos[b, h], np.iinfo(np.int32).max))[: int((pos[b, h] >= 0).sum())]
                     for h in range(pos.shape[1])]
            n = max(len(o) for o in order)
            kb = np.zeros((n, self.num_kv_heads, self.head_dim), np.float32)
            vb = np.zeros_like(kb)
            for h, o in enumerate(order):
                kb[: len(o), h] = keys[b, h, o]
                vb[: len(o), h] = values[b, h, o]
            out.append((jnp.asarray(kb.reshape(n, -1)), jnp.asarray(vb.reshape(n, -1))))
        return out[0] if len(out) == 1 else out

    def _dense_kv(self, layer):
        """Keys/values as [B, Hkv, C', D] aligned with head_positions()."""
        if hasattr(layer, "dense_kv"):
            return [np.asarray(x, np.float32) for x in layer.dense_kv()]
        return np.asarray(layer.k, np.float32), np.asarray(layer.v, np.float32)

    def get_cached_positions(self) -> np.ndarray:
        """i32[B, Hkv, C']: resident original positions per row and head (-1 = empty)."""
        if self._state is None:
            return np.zeros((0, self.num_kv_heads, 0), np.int32)
        return np.asarray(self._state["layer"].head_positions())

    def get_cache_stats(self) -> dict[str, Any]:
        """Measured statistics.

        cache_utilization: resident entries / allocated entries (rows x heads x cache_size).
        total_evictions: tokens removed to make room (per row, summed over rows).
        hit_rate: the share of each query's attention mass over a shadow full cache (every token
          seen) that falls on tokens resident in this cache after the query's step, averaged over
          heads, rows and steps; None when no queries were given or tracking is off.
        cache_bytes: bytes the cache arrays occupy; full_cache_bytes: a bf16 cache of every token seen.
        """
        stats = {"policy": self.policy.label, "cache_size": self.cache_size, "total_updates": self.total_updates,
                 "total_evictions": self.total_evictions, "policy_switches": self.policy_switches}
        if self._state is None:
            stats.update(cache_utilization=0.0, current_size=0, hit_rate=None, cache_bytes=0, full_cache_bytes=0)
            return stats
        layer = self._state["layer"]
        resident = np.asarray(layer.resident_per_head())
        seen = np.asarray(self._state["length"])
        stats.update(
            cache_utilization=float(resident.sum() / (layer.slots_per_row * resident.shape[0])),
            current_size=int(resident.max()),
            hit_rate=(self._hit_sum / self._hit_steps) if self._hit_steps else None,
            cache_bytes=tree_nbytes(layer),
            full_cache_bytes=full_bf16_bytes(seen, num_layers=1, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim),
            tokens_seen=int(seen.sum()),
        )
        return stats

    # ------------------------------------------------------------------ control

    def change_policy(self, policy: SchedulingPolicy | str | CachePolicy, **policy_options) -> None:
        """Switches policy; the cache is reset (scores of one policy mean nothing to another)."""
        new = manager_policy(policy, self.cache_size, **(policy_options or self._policy_options))
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
    """Quest page selection for attention (hit_rate measures it); eviction when full is oldest-first."""

    def __init__(self, cache_size: int, hidden_size: int, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.QUEST, **kw)


class DuoAttentionScheduler(CacheSchedulingManager):
    """The seed's DuoAttention scheduler: sink_size sinks plus the most recent tokens, per head."""

    def __init__(self, cache_size: int, hidden_size: int, sink_size: int = 4, **kw):
        super().__init__(cache_size, hidden_size, SchedulingPolicy.DUOATTENTION, sink_size=sink_size, **kw)

