"""DuoAttention (Xiao et al., 2024): retrieval heads keep every token, streaming heads keep sinks
plus a recent window.

Only a fraction of KV heads retrieve from far back in the context; the others attend to the first
tokens (attention sinks) and the recent ones. The head pattern (which KV head of which layer is a
retrieval head) is static: calibrated once per model (`pikv_jax/calibrate/duo.py`: from attention
statistics now, learned gates by distillation later) and stored as JSON. Because it is static,
every head's capacity is static too, and the layer stores a pool (`PooledLayerCache`) in which
head h owns a fixed slot range:

    retrieval head: prompt + max_new_tokens slots (keeps everything)
    streaming head: min(n_sink + window, that) slots (first n_sink positions + last `window`)

so a layer with r retrieval heads of Hkv allocates r (S + N) + (Hkv - r)(n_sink + window) slots
instead of Hkv (S + N): memory really is saved. At decode a full streaming head overwrites its
oldest non-sink token (StreamingLLM); retrieval heads append. Attention runs head by head over
each head's own range. The prompt's own attention is full for every head (the forward pass is
exact; only the cache is sparse), whereas the paper also runs streaming heads' prefill attention
over sinks + window.

Not composable in `Composite` (its prefill writes the uniform layout).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, protected_mask
from pikv_jax.cache.policies.duo_pattern import load_pattern
from pikv_jax.cache.pooled import (
    PooledLayerCache,
    gather_prompt_pooled,
    init_pooled_cache,
    pooled_decode_attention,
    segments_from_sizes,
    write_token_pooled,
)

Pattern = tuple[tuple[bool, ...], ...]


def as_pattern(pattern) -> Pattern:
    """A nested tuple of bools (hashable) from nested sequences / arrays; validates the shape."""
    if pattern is None:
        raise ValueError("duo_attention needs a head pattern: pattern=[[bool per KV head] per layer] (True = "
                         "retrieval head); calibrate one with pikv_jax.calibrate.duo or use "
                         "DuoAttention.from_pattern_file(path)")
    try:
        rows = [list(r) for r in pattern]
    except TypeError as e:
        raise ValueError("pattern must be a sequence of per-layer sequences of bools, got "
                         f"{type(pattern).__name__}") from e
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pattern must have at least one layer and one KV head per layer")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"pattern rows have different numbers of KV heads: {sorted({len(r) for r in rows})}")
    for r in rows:
        for x in r:
            if not (isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and x in (0, 1))):
                raise ValueError(f"pattern entries must be booleans (True = retrieval head), got {x!r}")
    return tuple(tuple(bool(x) for x in r) for r in rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DuoAttention(CachePolicy):
    """Retrieval heads (full cache) and streaming heads (sinks + recent window) per KV head.

    pattern: per layer, per KV head, True = retrieval head; a tuple of tuples of bools (lists and
      arrays are converted). Required; shape [num_layers][num_kv_heads] of the model.
    n_sink: first positions every streaming head keeps (attention sinks), >= 0, default 64
      (DuoAttention's sink size).
    window: most recent positions every streaming head keeps (the newest token included), >= 1,
      default 256 (DuoAttention's recent size).
    group_reduce: reduction of the per-slot attention mass over a GQA group (mean | max | sum).
    budget_ratio / budget_tokens are not used: the memory budget is the pattern itself
      (`retrieval_fraction` of the heads keep everything); decode_evict is implied for streaming
      heads and must stay False.
    """

    name: ClassVar[str] = "duo_attention"
    layout: ClassVar[str] = "pooled"
    pattern: Pattern | None = None
    n_sink: int = 64
    window: int = 256

    def __post_init__(self):
        object.__setattr__(self, "pattern", as_pattern(self.pattern))
        if self.budget_ratio is not None or self.budget_tokens is not None:
            raise ValueError("duo_attention takes no budget_ratio / budget_tokens: its budget is the head pattern "
                             "(retrieval heads keep all tokens, streaming heads n_sink + window)")
        if self.decode_evict:
            raise ValueError("duo_attention: decode_evict must be False (streaming heads always evict their oldest "
                             "non-sink token; retrieval heads never evict)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError("window must be an integer >= 1 (the streaming heads' recent window), "
                             f"got {self.window!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}")
        super().__post_init__()

    @classmethod
    def from_pattern_file(cls, path, **overrides) -> "DuoAttention":
        """Policy from a pattern JSON (see duo_pattern.py); n_sink / window default to the file's."""
        data = load_pattern(path)
        kw = dict(pattern=data.retrieval, n_sink=data.n_sink, window=data.window)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ pattern

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def retrieval_fraction(self) -> float:
        """Share of KV heads (all layers) that are retrieval heads."""
        flat = [x for r in self.pattern for x in r]
        return sum(flat) / len(flat)

    @property
    def sparsity(self) -> float:
        """Share of KV heads that are streaming heads (1 - retrieval_fraction)."""
        return 1.0 - self.retrieval_fraction

    def layer_pattern(self, layer: int, num_kv_heads: int | None = None) -> tuple[bool, ...]:
        if not 0 <= layer < len(self.pattern):
            raise ValueError(f"duo_attention: layer {layer} is outside the pattern's {len(self.pattern)} layers "
                             "(the pattern was calibrated for another model)")
        row = self.pattern[layer]
        if num_kv_heads is not None and len(row) != num_kv_heads:
            raise ValueError(f"duo_attention: the pattern has {len(row)} KV heads in layer {layer}, the model "
                             f"{num_kv_heads}")
        return row

    def head_sizes(self, layer: int, capacity: int, num_kv_heads: int | None = None) -> tuple[int, ...]:
        """Static slots per KV head of `layer` when a retrieval head needs `capacity` slots."""
        stream = min(self.n_sink + self.window, capacity)
        return tuple(capacity if r else stream for r in self.layer_pattern(layer, num_kv_heads))

    # ------------------------------------------------------------------ layout

    def capacity_for(self, layer, prompt_len, max_new_tokens) -> int:
        """Slots of one retrieval head (prompt + generated tokens); streaming heads get fewer."""
        return prompt_len + max_new_tokens

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype) -> PooledLayerCache:
        sizes = self.head_sizes(layer, capacity, num_kv_heads)
        return init_pooled_cache(batch, num_kv_heads, sum(sizes), head_dim, dtype,
                                 segments=segments_from_sizes(sizes))

    def _check(self, layer, cache):
        if not isinstance(cache, PooledLayerCache) or cache.segments is None:
            raise ValueError("duo_attention needs the cache made by its init_layer_cache (a pooled layout with "
                             f"static head segments), got {type(cache).__name__}")
        self.layer_pattern(layer, cache.num_kv_heads)

    def has_room(self, layer, cache: PooledLayerCache):
        self._check(layer, cache)
        room = jnp.ones((cache.batch,), bool)
        for r, (s, e) in zip(self.pattern[layer], cache.segments):
            if r:
                room &= jnp.any(cache.pos[:, s:e] < 0, axis=-1)
        return room

    # ------------------------------------------------------------------ prefill

    def prefill(self, layer: int, cache: PooledLayerCache, ctx: PrefillContext, *, scores=None) -> PooledLayerCache:
        self._check(layer, cache)
        b, s, hk, _ = ctx.k.shape
        pos_h = jnp.broadcast_to(ctx.pos[:, None, :], (b, hk, s))
        retrieval = jnp.asarray(self.pattern[layer])[None, :, None]
        keep = (pos_h >= 0) & (retrieval | protected_mask(pos_h, ctx.lengths - 1, self.n_sink, self.window))
        full = [e - a for (a, e), r in zip(cache.segments, self.pattern[layer]) if r]
        if full and s > min(full):
            raise ValueError(f"duo_attention: a prompt of {s} tokens does not fit the retrieval heads' {min(full)} "
                             f"slots in layer {layer}")
        return gather_prompt_pooled(cache, ctx.k, ctx.v, ctx.pos, keep,
                                    score=jnp.broadcast_to(ctx.pos[:, None, :].astype(jnp.float32), (b, hk, s)))

    # ------------------------------------------------------------------ decode

    def decode_slot(self, layer, cache: PooledLayerCache, q_pos):
        """Retrieval head: its first free slot. Streaming head: its first free slot, else its oldest
        non-sink token (the sinks and the window stay resident)."""
        self._check(layer, cache)
        slots, oks = [], []
        big = jnp.iinfo(jnp.int32).max
        for r, (s, e) in zip(self.pattern[layer], cache.segments):
            pos = cache.pos[:, s:e]
            free = pos < 0
            has_free = jnp.any(free, axis=-1)
            slot = jnp.argmax(free, axis=-1).astype(jnp.int32)
            if not r:
                oldest = jnp.argmin(jnp.where(pos < self.n_sink, big, pos), axis=-1).astype(jnp.int32)
                slot = jnp.where(has_free, slot, oldest)
                has_free = jnp.ones_like(has_free)
            slots.append(s + slot)
            oks.append(has_free)
        return cache, jnp.stack(slots, axis=-1), jnp.all(jnp.stack(oks, axis=-1), axis=-1)

    def write(self, layer, cache: PooledLayerCache, k, v, q_pos, slot, active) -> PooledLayerCache:
        return write_token_pooled(cache, k, v, q_pos, slot, active,
                                  score=jnp.broadcast_to(q_pos[:, None].astype(jnp.float32), slot.shape))

    def attend(self, layer, cache: PooledLayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        """-> (out [B, H, D], mass f32[B, P]); each head reads only its own slot range."""
        return pooled_decode_attention(q, cache, q_pos, sliding_window=sliding_window, group_reduce=self.group_reduce)

    def observe(self, layer, cache, mass, q_pos, active):
        return cache
