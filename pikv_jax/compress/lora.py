"""`LoRACompressor`: learned low-rank down/up projections of keys and values (an NNX module).

codes = x @ down (dropout on the codes in training mode); reconstruction = (alpha / rank) codes @ up.
Parameters are per layer and KV head: down [L, Hkv, D, r], up [L, Hkv, r, D] for keys and for
values. They start as a random orthonormal projection and `calibrate(model)` / `init_from_svd`
sets them from the SVD basis (down = V_r, up = (rank / alpha) V_r^T), so at that point the
compressor reproduces `SVDCompressor` exactly; the distillation issue trains them from there. The
cache stores the rank-r codes and attention runs in the code space through the same
`LowRankPolicy` as SVD (pikv_jax/compress/lowrank.py), with decoders (alpha / rank) up.

hidden_size: Hkv * D (num_kv_heads given), or D for the seed's [B, S, hidden] layout (one head).
A standalone call accepts [B, S, hidden_size], [B, 1, S, hidden_size] and per-layer
[B, heads, S, head_dim] with heads * head_dim = hidden_size: each token's concatenated heads are
regrouped into the compressor's num_kv_heads heads of width hidden_size / num_kv_heads (with the
default num_kv_heads=1, one rank-r code per token of all heads together) and unpacking the result
regroups them back (pikv_jax/compress/base.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.compress.base import KVCompressor
from pikv_jax.compress.lowrank import LowRankBases, LowRankKV, LowRankPolicy, check_rank
from pikv_jax.compress.svd import SVDCompressor


class LoRACompressor(nnx.Module, KVCompressor):
    """rank r (1 <= r <= head dim), alpha > 0 (scale alpha / rank), dropout in [0, 1) on the codes
    in training mode (`.train()`; `.eval()` is the default). num_kv_heads / num_layers: shape of
    the parameter stacks (1 and 1 for standalone seed-style use)."""

    name = "lora"

    def __init__(self, hidden_size: int, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1, *,
                 num_kv_heads: int = 1, num_layers: int = 1, code_dtype=None, rngs: nnx.Rngs | None = None,
                 seed: int = 0):
        KVCompressor.__init__(self)
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        if num_kv_heads < 1 or hidden_size % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide hidden_size={hidden_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        head_dim = hidden_size // num_kv_heads
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"rank must be an integer, got {rank!r}")
        check_rank(rank, head_dim)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size, self.rank, self.alpha, self.dropout_rate = hidden_size, rank, float(alpha), float(dropout)
        self.num_kv_heads, self.num_layers, self.head_dim = num_kv_heads, num_layers, head_dim
        self.code_dtype = code_dtype
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed)
        shape = (num_layers, num_kv_heads, head_dim, rank)
        q_k = _orthonormal(rngs.params(), shape)
        q_v = _orthonormal(rngs.params(), shape)
        self.k_down = nnx.Param(q_k)
        self.k_up = nnx.Param(jnp.swapaxes(q_k, -1, -2) / self.scaling)
        self.v_down = nnx.Param(q_v)
        self.v_up = nnx.Param(jnp.swapaxes(q_v, -1, -2) / self.scaling)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def stored_layout(self, importance=None):
        return self.num_kv_heads, self.head_dim

    # ------------------------------------------------------------------ initialisation

    def init_from_svd(self, svd: SVDCompressor) -> "LoRACompressor":
        """down = V_r, up = V_r^T / scaling: reproduces the SVD compressor's reconstruction."""
        b = svd.bases
        if b is None:
            raise ValueError("init_from_svd needs a calibrated SVDCompressor")
        if (b.num_layers not in (1, self.num_layers) or b.num_kv_heads != self.num_kv_heads
                or b.head_dim != self.head_dim):
            raise ValueError(f"SVD bases {b} do not match LoRA layers={self.num_layers}, Hkv={self.num_kv_heads}, "
                             f"D={self.head_dim}")
        layers = [b.layer(l) for l in range(self.num_layers)]
        if any(x[0].shape[-1] != self.rank or x[2].shape[-1] != self.rank for x in layers):
            raise ValueError(f"SVD ranks {b.ranks(0)} differ from the LoRA rank {self.rank}")
        ek = jnp.asarray(np.stack([x[0] for x in layers]))
        ev = jnp.asarray(np.stack([x[2] for x in layers]))
        self.k_down.value, self.k_up.value = ek, jnp.swapaxes(ek, -1, -2) / self.scaling
        self.v_down.value, self.v_up.value = ev, jnp.swapaxes(ev, -1, -2) / self.scaling
        return self

    def calibrate(self, source, values=None, *, prompts=None, max_tokens: int = 512) -> "LoRACompressor":
        """SVD-calibrates (on a PiKVModel or given keys/values) and initialises from that basis."""
        svd = SVDCompressor(rank=self.rank).calibrate(source, values, prompts=prompts, max_tokens=max_tokens)
        if svd.bases.num_layers != self.num_layers:
            raise ValueError(f"calibration data has {svd.bases.num_layers} layers; this LoRACompressor has "
                             f"num_layers={self.num_layers}")
        return self.init_from_svd(svd)

    @classmethod
    def for_model(cls, config, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1, **kw) -> "LoRACompressor":
        """A LoRACompressor shaped for a model config (per layer, per KV head)."""
        return cls(config.num_key_value_heads * config.dim_per_head, rank, alpha, dropout,
                   num_kv_heads=config.num_key_value_heads, num_layers=config.num_hidden_layers, **kw)

    # ------------------------------------------------------------------ projections (differentiable)

    def _check(self, keys, layer: int):
        if keys.shape[1] != self.num_kv_heads or keys.shape[-1] != self.head_dim:
            raise ValueError(f"this LoRACompressor expects [B, {self.num_kv_heads}, S, {self.head_dim}] keys, "
                             f"got {tuple(keys.shape)}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for num_layers={self.num_layers}")

    def encode(self, keys, values, layer: int = 0):
        """keys, values [B, Hkv, S, D] -> codes [B, Hkv, S, r] each (dropout on codes in training)."""
        self._check(keys, layer)
        ck = jnp.einsum("bhsd,hdr->bhsr", keys.astype(jnp.float32), self.k_down.value[layer])
        cv = jnp.einsum("bhsd,hdr->bhsr", values.astype(jnp.float32), self.v_down.value[layer])
        return self.dropout(ck), self.dropout(cv)

    def reconstruct(self, keys, values, layer: int = 0):
        """(alpha / rank) codes @ up: the keys and values attention sees, [B, Hkv, S, D]."""
        ck, cv = self.encode(keys, values, layer)
        return (self.scaling * jnp.einsum("bhsr,hrd->bhsd", ck, self.k_up.value[layer]),
                self.scaling * jnp.einsum("bhsr,hrd->bhsd", cv, self.v_up.value[layer]))

    # ------------------------------------------------------------------ compressor interface

    def compress(self, keys, values, importance=None, *, layer: int = 0) -> LowRankKV:
        """Codes of keys/values [B, Hkv, S, D] under `layer`'s projections (`compressor(k, v, layer=l)`)."""
        ck, cv = self.encode(keys, values, layer)
        dtype = self.code_dtype if self.code_dtype is not None else keys.dtype
        return LowRankKV(ck=ck.astype(dtype), cv=cv.astype(dtype), dec_k=self.scaling * self.k_up.value[layer],
                         dec_v=self.scaling * self.v_up.value[layer])

    def bases(self) -> LowRankBases:
        """Snapshot of the current parameters as per-layer encoders/decoders (for generation)."""
        kd, ku = np.asarray(self.k_down.value), np.asarray(self.k_up.value) * self.scaling
        vd, vu = np.asarray(self.v_down.value), np.asarray(self.v_up.value) * self.scaling
        return LowRankBases(list(kd), list(ku), list(vd), list(vu))

    def as_policy(self, inner=None) -> LowRankPolicy:
        """The cache policy with the *current* parameters (call again after training)."""
        return LowRankPolicy(inner=inner if inner is not None else CachePolicy(), bases=self.bases(),
                             code_dtype=self.code_dtype, method="lora")


def _orthonormal(key, shape):
    """Random matrices [..., D, r] with orthonormal columns."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, shape, jnp.float32))
    return q
