"""The compressor interface, shared by every method in pikv_jax/compress.

A compressor has two faces:
- standalone, the PiKV seed's call shape: `compressed = compressor(keys, values, importance=None)`
  returns a real, smaller pytree (a `CompressedKV`) that attention can consume
  (`compressed.attend(q)`) and that decompresses (`compressor.decompress(compressed)`);
- in generation: `compressor.as_policy(inner)` returns a cache policy (possibly wrapping an
  eviction policy) that `PiKVModel.generate(policy=...)` and `pikv generate --compress` use.

Shapes: keys and values are [B, Hkv, S, D] (the cache layout) or, as in the seed, [B, S, hidden]
(treated as one head of width hidden). `importance` is optional f32[B, S] (or [B, Hkv, S]) token
importance for methods that select tokens. Keyword arguments of a call go to `compress`: `layer=`
(the layer whose bases or budget apply: SVD, LoRA, pyramid) and `queries=` (the last queries, which
FastV and ChunkKV score tokens by when no importance is given); a call keeps no state but its stats.
`get_compression_stats()` reports measured numbers of the calls so far: compression_ratio = bytes of
an uncompressed bf16 K+V of the same tokens / bytes actually stored (codes, scales, metadata,
residual), reconstruction errors, per-method usage.
"""

from __future__ import annotations

import abc
import dataclasses

import jax.numpy as jnp
import numpy as np

from pikv_jax.cache.state import full_bf16_bytes, tree_nbytes


@dataclasses.dataclass(frozen=True)
class LayerQKV:
    """One layer's prompt tensors (numpy): q [B, S, H, D], k, v [B, Hkv, S, D] (keys after RoPE),
    pos i32[B, S] (-1 = padding)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    pos: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.pos >= 0


def as_cache_layout(keys, values):
    """-> (keys, values as [B, Hkv, S, D], restore function back to the caller's layout)."""
    keys, values = jnp.asarray(keys), jnp.asarray(values)
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if keys.ndim == 3:  # seed layout [B, S, hidden]
        return keys[:, None], values[:, None], lambda x: x[:, 0]
    if keys.ndim == 4:
        return keys, values, lambda x: x
    raise ValueError(f"keys must be [B, Hkv, S, D] or [B, S, hidden], got shape {tuple(keys.shape)}")


def check_finite(name: str, x) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf")


class CompressedKV(abc.ABC):
    """A compressed K/V pytree. Subclasses are registered dataclasses."""

    @abc.abstractmethod
    def decompress(self):
        """-> (keys, values) [B, Hkv, S, D] float32 (S: tokens represented, positions kept)."""

    @abc.abstractmethod
    def attend(self, q):
        """q [B, H, D] (H a multiple of Hkv) -> attention output [B, H, D] over the stored tokens."""

    def nbytes(self) -> int:
        return tree_nbytes(self)


@dataclasses.dataclass
class CompressionStats:
    """Accumulates measured numbers over calls."""

    calls: int = 0
    tokens: int = 0
    stored_bytes: int = 0
    full_bf16_bytes: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0
    max_abs_error: float = 0.0
    usage: dict = dataclasses.field(default_factory=dict)

    def record(self, keys, values, compressed: CompressedKV, method: str) -> None:
        """keys, values [B, Hkv, S, D] (the call's input) against what `compressed` stores and restores."""
        b, hk, s, d = keys.shape
        restored_k, restored_v = compressed.decompress()
        keys, values = jnp.asarray(keys, jnp.float32), jnp.asarray(values, jnp.float32)
        err_k = jnp.asarray(restored_k, jnp.float32) - keys
        err_v = jnp.asarray(restored_v, jnp.float32) - values
        self.calls += 1
        self.tokens += b * s
        self.stored_bytes += compressed.nbytes()
        self.full_bf16_bytes += full_bf16_bytes(b * s, num_layers=1, num_kv_heads=hk, head_dim=d)
        self.sq_error += float(jnp.sum(err_k ** 2) + jnp.sum(err_v ** 2))
        self.sq_norm += float(jnp.sum(keys ** 2) + jnp.sum(values ** 2))
        self.max_abs_error = max(self.max_abs_error, float(jnp.max(jnp.abs(err_k))), float(jnp.max(jnp.abs(err_v))))
        self.usage[method] = self.usage.get(method, 0) + 1

    def as_dict(self) -> dict:
        return {
            "calls": self.calls,
            "tokens": self.tokens,
            "stored_bytes": self.stored_bytes,
            "full_bf16_bytes": self.full_bf16_bytes,
            "compression_ratio": (self.full_bf16_bytes / self.stored_bytes) if self.stored_bytes else None,
            "relative_error": float(np.sqrt(self.sq_error / self.sq_norm)) if self.sq_norm else None,
            "max_abs_error": self.max_abs_error if self.calls else None,
            "method_usage": dict(self.usage),
        }


class KVCompressor(abc.ABC):
    """Base of every compressor (see the module docstring)."""

    name: str = "compressor"

    def __init__(self):
        self._stats = CompressionStats()

    def __call__(self, keys, values, importance=None, **kwargs) -> CompressedKV:
        """The seed's standalone call: validates keys/values (either layout), compresses them with
        `compress(keys, values, importance, **kwargs)` and records the measured stats."""
        k, v, _ = as_cache_layout(keys, values)
        check_finite("keys", k)
        check_finite("values", v)
        compressed = self.compress(k, v, importance, **kwargs)
        self._stats.record(k, v, compressed, self.usage_name(importance))
        return compressed

    @abc.abstractmethod
    def compress(self, keys, values, importance=None) -> CompressedKV:
        """keys, values: [B, Hkv, S, D] (validated) -> CompressedKV. Subclasses may take keyword
        arguments (`layer=`, `queries=`), which a call passes through."""

    def usage_name(self, importance=None) -> str:
        """The method a call with this importance counts in `method_usage` (PiKVCompressor: the
        sub-method it chooses)."""
        return self.name

    def decompress(self, compressed: CompressedKV):
        return compressed.decompress()

    @abc.abstractmethod
    def as_policy(self, inner=None):
        """The cache policy that applies this compression in generation (wrapping `inner`)."""

    def get_compression_stats(self) -> dict:
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        self._stats = CompressionStats()

