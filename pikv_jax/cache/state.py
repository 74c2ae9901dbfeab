"""KV-cache pytrees: one `LayerCache` per decoder layer, gathered in a `KVCache`.

Each layer stores Hkv heads (never repeated query heads) in `capacity` slots. A slot holds a key,
a value, the original position of its token (-1 = empty) and a policy score. Slots are not kept in
position order: eviction overwrites a victim slot in place (O(C) per step, static shapes). Rows of
a batch are independent and ragged: each has its own length and resident set, and with per-head
policies each (row, head) pair has its own set.

Bytes are counted from the arrays actually allocated; `full_bf16_bytes` is what an uncompressed
bfloat16 cache of the same tokens would take, the denominator of every compression ratio.
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b hk c d" are not forward references)

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int32

EMPTY = -1  # position value of an empty slot


def static_field(**kw):
    """A dataclass field that is part of the treedef (static under jit), not an array leaf."""
    return struct.field(pytree_node=False, **kw)


def pytree_dataclass(cls):
    """A frozen dataclass registered as a pytree: array fields are leaves, `static_field`s go in the
    treedef (the `struct.field(pytree_node=...)` convention of `flax.struct.dataclass`), plus `replace`.

    Unlike `jax.tree_util.register_dataclass`, unflattening does not call `__init__`: jax rebuilds
    pytrees with leaves that are not arrays (None, shardings, ShapeDtypeStructs from `eval_shape`,
    numpy arrays from `device_get`), which the jaxtyping field annotations checked at test time
    (tests/conftest.py) would rightly reject. Explicit construction and `replace` still go through
    `__init__` and are checked.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
    meta = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in data)

    def flatten_with_keys(x):
        return [(k, getattr(x, n)) for k, n in zip(keys, data)], tuple(getattr(x, n) for n in meta)

    def flatten(x):
        return [getattr(x, n) for n in data], tuple(getattr(x, n) for n in meta)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, value in zip(data, children):
            object.__setattr__(obj, n, value)
        for n, value in zip(meta, aux):
            object.__setattr__(obj, n, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    cls.replace = lambda self, **updates: dataclasses.replace(self, **updates)
    return cls


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf (works on concrete arrays and on ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


class SlotCacheBase:
    """What every per-layer cache layout derives from its `pos` array (i32[B, Hkv, C] per head, or
    i32[B, P] for a pooled layout) and its stored values, declared once.

    A layout names the array whose last axis is the head dimension in `head_dim_field`.
    """

    head_dim_field: ClassVar[str] = "k"

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def capacity(self) -> int:
        """Slots per (row, KV head), or per row for a pooled layout."""
        return self.pos.shape[-1]

    @property
    def head_dim(self) -> int:
        return getattr(self, self.head_dim_field).shape[-1]

    @property
    def valid(self) -> jax.Array:
        """bool, shape of `pos`: slot holds a token."""
        return self.pos >= 0

    @property
    def slots_per_row(self) -> int:
        """Token slots allocated per row, all KV heads together."""
        return int(np.prod(self.pos.shape[1:]))

    def nbytes(self) -> int:
        """Bytes of every array the layout allocates (values or codes, scales, positions, scores, state)."""
        return tree_nbytes(self)

    def head_positions(self) -> jax.Array | np.ndarray:
        """i32[B, Hkv, C]: resident positions per KV head (-1 = none); the layout-independent view
        that statistics and invariant tests use (a NumPy array for a cache moved to the host)."""
        return self.pos

    def resident_per_head(self) -> jax.Array | np.ndarray:
        """i32[B, Hkv]: tokens resident per row and KV head."""
        return jnp.sum(self.head_positions() >= 0, axis=-1)


class PerHeadSlotCache(SlotCacheBase):
    """A layout with its own C slots per (row, KV head): `pos` is i32[B, Hkv, C]."""

    @property
    def num_kv_heads(self) -> int:
        return self.pos.shape[1]

    @property
    def slots_per_row(self) -> int:
        """Token slots allocated per row: C per KV head."""
        return self.num_kv_heads * self.capacity


@pytree_dataclass
class LayerCache(PerHeadSlotCache):
    """One layer's cache.

    k, v:   [B, Hkv, C, D]   keys after RoPE, values
    pos:    i32[B, Hkv, C]   original token position per slot, EMPTY (-1) when the slot is free
    score:  f32[B, Hkv, C]   policy accumulator (attention mass, norms, ...)
    extra:  dict of policy state arrays (e.g. LRU's last-use step, Quest's page bounds)
    """

    k: Float[Array, "b hk c d"]
    v: Float[Array, "b hk c d"]
    pos: Int32[Array, "b hk c"]
    score: Float[Array, "b hk c"]
    extra: dict[str, Any] = struct.field(default_factory=dict)


@pytree_dataclass
class KVCache:
    """All layers' caches plus the per-row count of tokens seen (= position of the next token).

    `length` counts tokens fed to the model, resident or evicted; resident counts come from `pos`.
    """

    layers: tuple[SlotCacheBase, ...]  # LayerCache or another layout (quantized, pooled, low-rank, ...)
    length: Int32[Array, " b"]

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    def nbytes(self) -> int:
        """Bytes actually allocated: keys, values (or codes and scales), positions, scores, policy state."""
        return tree_nbytes(self)

    def capacities(self) -> tuple[int, ...]:
        """Slots per layer (per KV head for uniform layouts; pooled layouts report their pool)."""
        return tuple(layer.capacity for layer in self.layers)

    def resident_tokens(self) -> np.ndarray:
        """i64[L, B, Hkv]: tokens resident per layer, row and KV head (host-side statistic)."""
        return np.stack([np.asarray(layer.resident_per_head()) for layer in self.layers])


def full_bf16_bytes(num_tokens: ArrayLike, *, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of an uncompressed bf16 K+V cache holding `num_tokens` tokens (summed over rows)."""
    return int(np.sum(num_tokens)) * num_layers * num_kv_heads * head_dim * 2 * 2


def init_layer_cache(batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype,
                     extra: dict[str, Any] | None = None) -> LayerCache:
    """An empty layer cache: C slots per (row, KV head), every position EMPTY."""
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


def init_cache(batch: int, capacities: int | Sequence[int], *, num_layers: int, num_kv_heads: int,
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

