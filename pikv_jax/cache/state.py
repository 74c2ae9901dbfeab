"""KV-cache pytrees: one `LayerCache` per decoder layer, gathered in a `KVCache`.

Each layer stores Hkv heads (never repeated query heads) in `capacity` slots. A slot holds a key,
a value, the original position of its token (-1 = empty) and a policy score. Slots are not kept in
position order: eviction overwrites a victim slot in place (O(C) per step, static shapes). Rows of
a batch are independent and ragged: each has its own length and resident set, and with per-head
policies each (row, head) pair has its own set.

Bytes are counted from the arrays actually allocated; `full_bf16_bytes` is what an uncompressed
bfloat16 cache of the same tokens would take, the denominator of every compression ratio.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY = -1  # position value of an empty slot


def _pytree_dataclass(cls):
    """Frozen dataclass registered as a pytree; fields marked `static` are part of the treedef."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        (meta if f.metadata.get("static") else data).append(f.name)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field(**kw):
    return dataclasses.field(metadata={"static": True}, **kw)


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf (works on concrete arrays and on ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


@_pytree_dataclass
class LayerCache:
    """One layer's cache.

    k, v:   [B, Hkv, C, D]   keys after RoPE, values
    pos:    i32[B, Hkv, C]   original token position per slot, EMPTY (-1) when the slot is free
    score:  f32[B, Hkv, C]   policy accumulator (attention mass, norms, ...)
    extra:  dict of policy state arrays (e.g. LRU's last-use step, Quest's page bounds)
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.pos.shape[1]

    @property
    def capacity(self) -> int:
        return self.pos.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]

    @property
    def valid(self) -> jax.Array:
        """bool[B, Hkv, C]: slot holds a token."""
        return self.pos >= 0

    def replace(self, **kw) -> "LayerCache":
        return dataclasses.replace(self, **kw)

    def nbytes(self) -> int:
        return tree_nbytes(self)

    def head_positions(self) -> jax.Array:
        """i32[B, Hkv, C]: resident positions per KV head (-1 = none); the layout-independent view
        that statistics and invariant tests use (other cache layouts implement the same method)."""
        return self.pos

    @property
    def slots_per_row(self) -> int:
        """Token slots allocated per row, all KV heads together."""
        return self.num_kv_heads * self.capacity

    def resident_per_head(self) -> jax.Array:
        """i32[B, Hkv]: tokens resident per row and KV head."""
        return jnp.sum(self.head_positions() >= 0, axis=-1)


@_pytree_dataclass
class KVCache:
    """All layers' caches plus the per-row count of tokens seen (= position of the next token).

    `length` counts tokens fed to the model, resident or evicted; resident counts come from `pos`.
    """

    layers: tuple[LayerCache, ...]
    length: jax.Array  # i32[B]

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    def replace(self, **kw) -> "KVCache":
        return dataclasses.replace(self, **kw)

    def nbytes(self) -> int:
        """Bytes actually allocated: keys, values (or codes and scales), positions, scores, policy state."""
        return tree_nbytes(self)

    def capacities(self) -> tuple[int, ...]:
        """Slots per layer (per KV head for uniform layouts; pooled layouts report their pool)."""
        return tuple(layer.capacity for layer in self.layers)

    def resident_tokens(self) -> np.ndarray:
        """i64[L, B, Hkv]: tokens resident per layer, row and KV head (host-side statistic)."""
        return np.stack([np.asarray(layer.resident_per_head()) for layer in self.layers])


def full_bf16_bytes(num_tokens: int | np.ndarray, *, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of an uncompressed bf16 K+V cache holding `num_tokens` tokens (summed over rows)."""
    return int(np.sum(num_tokens)) * num_layers * num_kv_heads * head_dim * 2 * 2


def init_layer_cache(batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype,
                     extra: dict[str, Any] | None = None) -> LayerCache:
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1, got {capacity}")
    shape = (batch, num_kv_heads, capacity)
    return LayerCache(
        k=jnp.zeros(shape + (head_dim,), dtype),
        v=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, EMPTY, jnp.int32),
        score=jnp.zeros(shape, jnp.float32),
        extra=dict(extra or {}),
    )


def init_cache(batch: int, capacities: int | tuple[int, ...], *, num_layers: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32) -> KVCache:
    """An empty cache. `capacities` is one int for every layer or one per layer (pyramid budgets)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if isinstance(capacities, int):
        capacities = (capacities,) * num_layers
    if len(capacities) != num_layers:
        raise ValueError(f"capacities has {len(capacities)} entries, expected one per layer ({num_layers})")
    layers = tuple(init_layer_cache(batch, num_kv_heads, int(c), head_dim, dtype) for c in capacities)
    return KVCache(layers=layers, length=jnp.zeros((batch,), jnp.int32))

