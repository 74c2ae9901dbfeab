"""The compressor interface, shared by every method in pikv_jax/compress.

A compressor has two faces:
- standalone, the PiKV seed's call shape: `compressed = compressor(keys, values, importance=None)`
  returns a real, smaller pytree (a `CompressedKV`) that attention can consume
  (`compressed.attend(q)`) and that decompresses (`compressor.decompress(compressed)`);
- in generation: `compressor.as_policy(inner)` returns a cache policy (possibly wrapping an
  eviction policy) that `PiKVModel.generate(policy=...)` and `pikv generate --compress` use.

Unpacking, the seed guide's `compressed_keys, compressed_values = compressor(keys, values, importance)`:
iterating a `CompressedKV` yields (keys, values) as attention reads them after compression, in the
caller's layout and dtype ([B, S, hidden] in -> [B, S, hidden] out, [B, heads, S, head_dim] in ->
the same): `restore(decompress())`, i.e. dequantized (KIVI), reconstructed from the codes (SVD,
LoRA), or, for token selection (FastV, ChunkKV, pyramid), every position kept with dropped tokens
zero (positions stay aligned with the input; `compressed.attend(q)` excludes them, dense attention
over the unpacked tensors would not). The object itself stays the smaller pytree: `.nbytes()`,
`.attend(q)`, `.decompress()` (the stored layout [B, Hkv, S, D], float32) are unchanged.

Layouts. keys and values are [B, Hkv, S, D] (the cache layout, as a model gives them per layer) or,
as in the seed, [B, S, hidden] (one head of width hidden). A compressor constructed with
`hidden_size` accepts exactly [B, S, hidden_size], [B, 1, S, hidden_size] and per-layer
[B, heads, S, head_dim] with heads * head_dim == hidden_size; anything else raises one ValueError
naming `keys`, hidden_size and these layouts. A compressor whose parameters have a fixed width
(`stored_layout()`: LoRA's (num_kv_heads, hidden_size / num_kv_heads), an SVD built with
hidden_size (1, hidden_size) or calibrated per KV head) compresses the concatenated heads of each
token: keys [B, H, S, D] are regrouped [B, H, S, D] -> [B, S, H * D] -> [B, Hc, S, hidden / Hc] and
unpacking regroups them back. Token selectors and quantization keep the heads as given.

`importance` is optional f32[B, S] (or [B, Hkv, S]) token importance for methods that select
tokens. Keyword arguments of a call go to `compress`: `layer=` (the layer whose bases or budget
apply: SVD, LoRA, pyramid) and `queries=` (the last queries, which FastV and ChunkKV score tokens
by when no importance is given); a call keeps no state but its stats.

`get_compression_stats()` reports measured numbers of the calls so far: input_bytes (K + V as the
caller passed them, in their dtype), stored_bytes (what the results hold: codes, scales,
minimums, metadata, residual, kept tokens), compression_ratio = input_bytes / stored_bytes,
compression_ratio_vs_bf16 = full_bf16_bytes (an uncompressed bf16 K+V of the same tokens) /
stored_bytes, reconstruction errors, per-method usage.
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a call's keys map to the stored [B, Hkv, S, D] layout and back (hashable: a static field
    of every CompressedKV). seed: the caller passed [B, S, hidden]; heads / width: the caller's
    heads and head width (after adding the seed's head axis); stored_heads / stored_width: the
    stored ones (equal to heads / width unless regrouped); dtype: the caller's dtype (None: keep
    float32)."""

    seed: bool = False
    heads: int = 0
    width: int = 0
    stored_heads: int = 0
    stored_width: int = 0
    dtype: str | None = None

    @property
    def regrouped(self) -> bool:
        return (self.heads, self.width) != (self.stored_heads, self.stored_width)

    def to_stored(self, x):
        """Caller's layout -> [B, stored_heads, S, stored_width]."""
        x = x[:, None] if self.seed else x
        if self.regrouped:
            b, _, s, _ = x.shape
            x = jnp.swapaxes(jnp.swapaxes(x, 1, 2).reshape(b, s, self.stored_heads, self.stored_width), 1, 2)
        return x

    def restore(self, x):
        """[B, stored_heads, S, stored_width] -> the caller's layout and dtype."""
        if self.regrouped:
            b, _, s, _ = x.shape
            x = jnp.swapaxes(jnp.swapaxes(x, 1, 2).reshape(b, s, self.heads, self.width), 1, 2)
        x = x[:, 0] if self.seed else x
        return x.astype(self.dtype) if self.dtype is not None else x


CACHE_LAYOUT = Layout()  # compress() called directly: the stored layout, float32


def layout_error(shape, hidden_size: int) -> ValueError:
    return ValueError(f"keys of shape {tuple(shape)} do not fit hidden_size={hidden_size}; allowed layouts: "
                      f"[B, S, {hidden_size}], [B, 1, S, {hidden_size}] or per layer [B, heads, S, head_dim] with "
                      f"heads * head_dim = {hidden_size}")


def check_hidden_size(hidden_size) -> int | None:
    """None or an integer >= 1 (returned as int)."""
    if hidden_size is None:
        return None
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
        raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
    return int(hidden_size)


def caller_layout(keys, values, hidden_size: int | None = None, stored: tuple[int, int] | None = None):
    """-> (keys, values in the stored layout [B, Hkv, S, D], the call's Layout).

    hidden_size: the compressor's (validates the layouts it allows); stored: (heads, width) the
    compressor stores (None, or another width per token: as given)."""
    dtype = jnp.result_type(keys)
    keys, values = jnp.asarray(keys), jnp.asarray(values)
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if keys.ndim not in (3, 4):
        if hidden_size is not None:
            raise layout_error(keys.shape, hidden_size)
        raise ValueError(f"keys must be [B, Hkv, S, D] or [B, S, hidden], got shape {tuple(keys.shape)}")
    heads, width = (1, keys.shape[-1]) if keys.ndim == 3 else (keys.shape[1], keys.shape[3])
    if hidden_size is not None and heads * width != hidden_size:
        raise layout_error(keys.shape, hidden_size)
    # another width than the stored one: kept as given (the compressor's own checks name the mismatch)
    sh, sw = stored if stored is not None and stored[0] * stored[1] == heads * width else (heads, width)
    layout = Layout(seed=keys.ndim == 3, heads=heads, width=width, stored_heads=sh, stored_width=sw,
                    dtype=jnp.dtype(dtype).name)
    return layout.to_stored(keys), layout.to_stored(values), layout


def check_finite(name: str, x) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf")


class CompressedKV(abc.ABC):
    """A compressed K/V pytree. Subclasses are registered dataclasses with a static field
    `layout: Layout = static_field(default=CACHE_LAYOUT)` (the call sets it)."""

    layout: Layout

    @abc.abstractmethod
    def decompress(self):
        """-> (keys, values) [B, Hkv, S, D] float32 (S: tokens represented, positions kept)."""

    @abc.abstractmethod
    def attend(self, q):
        """q [B, H, D] (H a multiple of Hkv) -> attention output [B, H, D] over the stored tokens."""

    def nbytes(self) -> int:
        return tree_nbytes(self)

    def unpacked(self):
        """(keys, values) as attention reads them after compression, in the caller's layout and
        dtype (see the module docstring): `layout.restore` of `decompress()`."""
        k, v = self.decompress()
        return self.layout.restore(k), self.layout.restore(v)

    def __iter__(self):
        """`keys, values = compressed` (the seed guide's unpacking): `unpacked()`."""
        return iter(self.unpacked())


def input_nbytes(x) -> int:
    """Bytes of an array as the caller passed it (its own dtype)."""
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(dtype).itemsize


@dataclasses.dataclass
class CompressionStats:
    """Accumulates measured numbers over calls."""

    calls: int = 0
    tokens: int = 0
    input_bytes: int = 0
    stored_bytes: int = 0
    full_bf16_bytes: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0
    max_abs_error: float = 0.0
    usage: dict = dataclasses.field(default_factory=dict)

    def record(self, keys, values, compressed: CompressedKV, method: str, input_bytes: int | None = None) -> None:
        """keys, values [B, Hkv, S, D] (the call's input, stored layout) against what `compressed`
        stores and restores; input_bytes: K + V as the caller passed them (default: these arrays)."""
        b, hk, s, d = keys.shape
        if input_bytes is None:
            input_bytes = input_nbytes(keys) + input_nbytes(values)
        restored_k, restored_v = compressed.decompress()
        keys, values = jnp.asarray(keys, jnp.float32), jnp.asarray(values, jnp.float32)
        err_k = jnp.asarray(restored_k, jnp.float32) - keys
        err_v = jnp.asarray(restored_v, jnp.float32) - values
        self.calls += 1
        self.tokens += b * s
        self.input_bytes += int(input_bytes)
        self.stored_bytes += compressed.nbytes()
        self.full_bf16_bytes += full_bf16_bytes(b * s, num_layers=1, num_kv_heads=hk, head_dim=d)
        self.sq_error += float(jnp.sum(err_k ** 2) + jnp.sum(err_v ** 2))
        self.sq_norm += float(jnp.sum(keys ** 2) + jnp.sum(values ** 2))
        self.max_abs_error = max(self.max_abs_error, float(jnp.max(jnp.abs(err_k))), float(jnp.max(jnp.abs(err_v))))
        self.usage[method] = self.usage.get(method, 0) + 1

    def as_dict(self) -> dict:
        ratio = lambda full: (full / self.stored_bytes) if self.stored_bytes else None
        return {
            "calls": self.calls,
            "tokens": self.tokens,
            "input_bytes": self.input_bytes,
            "stored_bytes": self.stored_bytes,
            "full_bf16_bytes": self.full_bf16_bytes,
            "compression_ratio": ratio(self.input_bytes),
            "compression_ratio_vs_bf16": ratio(self.full_bf16_bytes),
            "relative_error": float(np.sqrt(self.sq_error / self.sq_norm)) if self.sq_norm else None,
            "max_abs_error": self.max_abs_error if self.calls else None,
            "method_usage": dict(self.usage),
        }


class KVCompressor(abc.ABC):
    """Base of every compressor (see the module docstring). A subclass constructed with a hidden
    size stores it as `hidden_size` (None: any layout)."""

    name: str = "compressor"
    hidden_size: int | None = None

    def __init__(self):
        self._stats = CompressionStats()

    def __call__(self, keys, values, importance=None, **kwargs) -> CompressedKV:
        """The seed's standalone call: validates keys/values (the layouts of the module docstring),
        brings them to `stored_layout(importance)`, compresses them with
        `compress(keys, values, importance, **kwargs)`, records the measured stats and returns the
        result, which remembers the caller's layout for unpacking."""
        k, v, layout = caller_layout(keys, values, self.hidden_size, self.stored_layout(importance))
        check_finite("keys", k)
        check_finite("values", v)
        compressed = self.compress(k, v, importance, **kwargs).replace(layout=layout)
        self._stats.record(k, v, compressed, self.usage_name(importance), input_nbytes(keys) + input_nbytes(values))
        return compressed

    def stored_layout(self, importance=None) -> tuple[int, int] | None:
        """(heads, width) the compressor stores keys in, or None: as the caller gives them. A call
        regroups the concatenated heads of each token into it (see the module docstring)."""
        return None

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
