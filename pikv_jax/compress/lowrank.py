"""Low-rank KV compression: the cache stores rank-r codes and attention runs in the code space.

Per layer and KV head h, an encoder E [D, r] maps a key (after RoPE) or value to its code c = x E
and a decoder P [r, D] maps it back, x^ = c P. SVD: E = V_r (top right singular vectors of the
calibration keys / values of that head), P = V_r^T, an orthogonal projection. LoRA: learned
E = down, P = (alpha / rank) up, initialised from the SVD basis (pikv_jax/compress/lora.py). The SVD
fit and `SVDCompressor` are in pikv_jax/compress/svd.py.

Attention never reconstructs the cache (queries of a GQA group use their KV head's bases):
    logits = (q P_k^T) . c_k / sqrt(D)         (q P_k^T: [B, Hkv, G, r_k], once per step)
    out    = (probs . c_v) P_v                 (probs . c_v: [B, Hkv, G, r_v])
which equals attention over the reconstructed keys and values, reading r / D of the bytes.

Design of the bases: policies are static (hashable) jit arguments, bases are arrays. A
`LowRankBases` holds the per-layer numpy matrices and hashes by content, so a policy that holds
it stays hashable and two policies with equal bases share compiled code. At cache creation
(`init_layer_cache(layer, ...)`) the layer's matrices are copied into the `LowRankLayerCache`
itself (fields enc_k, dec_k, enc_v, dec_v: counted in its bytes as metadata); traced code reads
them from the cache, never from the policy, so they are inputs of the compiled program, not
constants baked into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pikv_jax.attention.reference import NEG_INF, reduce_group, visible
from pikv_jax.cache.policies.base import PrefillContext
from pikv_jax.cache.state import EMPTY, PerHeadSlotCache, static_field, tree_nbytes
from pikv_jax.compress.base import CACHE_LAYOUT, CompressedKV, Layout
from pikv_jax.compress.wrapper import DecodeByInner, check_inner

# ---------------------------------------------------------------------------------------------- bases


class LowRankBases:
    """Per-layer encoders/decoders, hashable by content (see the module docstring).

    enc_k[l]: [Hkv, D, r_k]; dec_k[l]: [Hkv, r_k, D]; enc_v[l]: [Hkv, D, r_v]; dec_v[l]: [Hkv, r_v, D].
    One layer given = the same bases for every layer.
    """

    def __init__(self, enc_k: Sequence, dec_k: Sequence, enc_v: Sequence, dec_v: Sequence):
        arrays = [tuple(np.ascontiguousarray(np.asarray(x, np.float32)) for x in seq)
                  for seq in (enc_k, dec_k, enc_v, dec_v)]
        n = len(arrays[0])
        if n == 0 or any(len(a) != n for a in arrays):
            raise ValueError("enc_k, dec_k, enc_v, dec_v need the same number (>= 1) of layers")
        for l in range(n):
            ek, dk, ev, dv = (a[l] for a in arrays)
            if ek.ndim != 3 or ev.ndim != 3 or dk.shape != (ek.shape[0], ek.shape[2], ek.shape[1]) \
                    or dv.shape != (ev.shape[0], ev.shape[2], ev.shape[1]) or ek.shape[:2] != ev.shape[:2]:
                raise ValueError(f"layer {l}: bases must be enc [Hkv, D, r] and dec [Hkv, r, D], got "
                                 f"{ek.shape}, {dk.shape}, {ev.shape}, {dv.shape}")
        self.enc_k, self.dec_k, self.enc_v, self.dec_v = arrays
        h = hashlib.sha1()
        for seq in arrays:
            for a in seq:
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        self._digest = h.hexdigest()

    @property
    def num_layers(self) -> int:
        return len(self.enc_k)

    @property
    def num_kv_heads(self) -> int:
        return self.enc_k[0].shape[0]

    @property
    def head_dim(self) -> int:
        return self.enc_k[0].shape[1]

    def ranks(self, layer: int) -> tuple[int, int]:
        ek, _, ev, _ = self.layer(layer)
        return ek.shape[-1], ev.shape[-1]

    def layer(self, layer: int):
        """(enc_k, dec_k, enc_v, dec_v) of `layer`."""
        if self.num_layers == 1:
            layer = 0
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"bases were calibrated for {self.num_layers} layers; layer {layer} is out of range")
        return self.enc_k[layer], self.dec_k[layer], self.enc_v[layer], self.dec_v[layer]

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, LowRankBases) and other._digest == self._digest

    def __repr__(self):
        ranks = sorted({self.ranks(l) for l in range(self.num_layers)})
        return f"LowRankBases(layers={self.num_layers}, Hkv={self.num_kv_heads}, D={self.head_dim}, ranks={ranks})"


def check_rank(rank: int, head_dim: int, what: str = "rank") -> None:
    if rank < 1:
        raise ValueError(f"{what} must be >= 1, got {rank}")
    if rank > head_dim:
        raise ValueError(f"{what}={rank} is larger than the head dimension {head_dim}")


# ---------------------------------------------------------------------------------------------- attention


def lowrank_attention(q, ck, cv, k_pos, q_pos, dec_k, dec_v, *, sliding_window=None, group_reduce="mean"):
    """Decode attention in the code space.

    q: [B, H, D]; ck: [B, Hkv, C, r_k]; cv: [B, Hkv, C, r_v]; k_pos: i32[B, Hkv, C] (-1 empty);
    q_pos: i32[B]; dec_k: [Hkv, r_k, D]; dec_v: [Hkv, r_v, D].
    Returns out [B, H, D] (q's dtype) and mass f32[B, Hkv, C] reduced over each GQA group.
    """
    b, h, d = q.shape
    hk = ck.shape[1]
    qg = q.reshape(b, hk, h // hk, d).astype(jnp.float32)
    qr = jnp.einsum("bhgd,hrd->bhgr", qg, dec_k.astype(jnp.float32))
    logits = jnp.einsum("bhgr,bhcr->bhgc", qr, ck.astype(jnp.float32)) * d ** -0.5
    mask = visible(q_pos[:, None, None, None], k_pos[:, :, None, :], sliding_window)
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
    o_r = jnp.einsum("bhgc,bhcr->bhgr", probs, cv.astype(jnp.float32))
    out = jnp.einsum("bhgr,hrd->bhgd", o_r, dec_v.astype(jnp.float32))
    return out.reshape(b, h, d).astype(q.dtype), reduce_group(probs, group_reduce, axis=2)


def encode(x, enc):
    """x [B, Hkv, ..., D] (heads second), enc [Hkv, D, r] -> codes [B, Hkv, ..., r] (float32)."""
    return jnp.einsum("bh...d,hdr->bh...r", x.astype(jnp.float32), enc.astype(jnp.float32))


def decode(codes, dec):
    """codes [B, Hkv, ..., r], dec [Hkv, r, D] -> [B, Hkv, ..., D] (float32)."""
    return jnp.einsum("bh...r,hrd->bh...d", codes.astype(jnp.float32), dec.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------- standalone


@struct.dataclass
class LowRankKV(CompressedKV):
    """Standalone low-rank K/V: codes ck [B, Hkv, S, r_k], cv [B, Hkv, S, r_v] and the decoders
    dec_k [Hkv, r_k, D], dec_v [Hkv, r_v, D] needed to read them (counted in the stored bytes);
    layout: the caller's (for unpacking, pikv_jax/compress/base.py)."""

    ck: jax.Array
    cv: jax.Array
    dec_k: jax.Array
    dec_v: jax.Array
    layout: Layout = static_field(default=CACHE_LAYOUT)

    def decompress(self):
        return decode(self.ck, self.dec_k), decode(self.cv, self.dec_v)

    def attend(self, q):
        b, hk, s, _ = self.ck.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, hk, s))
        out, _ = lowrank_attention(q.astype(jnp.float32), self.ck, self.cv, pos, jnp.full((b,), s - 1, jnp.int32),
                                   self.dec_k, self.dec_v)
        return out


# ---------------------------------------------------------------------------------------------- cache


@struct.dataclass
class LowRankLayerCache(PerHeadSlotCache):
    """ck: [B, Hkv, C, r_k], cv: [B, Hkv, C, r_v] codes; pos i32[B, Hkv, C] (-1 empty); score
    f32[B, Hkv, C]; enc_k [Hkv, D, r_k], dec_k [Hkv, r_k, D], enc_v [Hkv, D, r_v], dec_v
    [Hkv, r_v, D]: this layer's bases (metadata); extra: policy state."""

    ck: jax.Array
    cv: jax.Array
    pos: jax.Array
    score: jax.Array
    enc_k: jax.Array
    dec_k: jax.Array
    enc_v: jax.Array
    dec_v: jax.Array
    extra: dict[str, Any] = struct.field(default_factory=dict)

    head_dim_field: ClassVar[str] = "dec_k"

    @property
    def rank_k(self) -> int:
        return self.ck.shape[-1]

    @property
    def rank_v(self) -> int:
        return self.cv.shape[-1]

    def metadata_bytes(self) -> int:
        return tree_nbytes((self.enc_k, self.dec_k, self.enc_v, self.dec_v))

    def dense_kv(self, dtype=jnp.float32):
        """Reconstructed keys and values [B, Hkv, C, D] aligned with `pos` (zeros in empty slots)."""
        return decode(self.ck, self.dec_k).astype(dtype), decode(self.cv, self.dec_v).astype(dtype)


def init_lowrank_layer(batch: int, num_kv_heads: int, capacity: int, bases_layer, dtype) -> LowRankLayerCache:
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1, got {capacity}")
    ek, dk, ev, dv = (jnp.asarray(x) for x in bases_layer)
    shape = (batch, num_kv_heads, capacity)
    return LowRankLayerCache(ck=jnp.zeros(shape + (ek.shape[-1],), dtype), cv=jnp.zeros(shape + (ev.shape[-1],), dtype),
                             pos=jnp.full(shape, EMPTY, jnp.int32), score=jnp.zeros(shape, jnp.float32),
                             enc_k=ek, dec_k=dk, enc_v=ev, dec_v=dv)


def _put(x, slot, values, active):
    """x[b, h, slot[b, h]] = values[b, h] for active rows."""
    b, hk = slot.shape
    si = jnp.where(active[:, None], slot, x.shape[2])
    return x.at[jnp.arange(b)[:, None], jnp.arange(hk)[None], si].set(values.astype(x.dtype), mode="drop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankPolicy(DecodeByInner):
    """Low-rank codes around an eviction policy (`inner`, default Full).

    bases: a LowRankBases (per-layer encoders/decoders). code_dtype: storage of the codes (None =
    the cache dtype). method: label ("svd" or "lora"). The inner policy chooses what is kept (its
    prefill writes a temporary full-precision cache that is then projected; its decode hooks pick
    slots and fold attention mass into scores); this policy owns the layout, writes and attention.
    """

    name: ClassVar[str] = "lowrank"
    bases: LowRankBases
    code_dtype: Any = None
    method: str = "svd"

    def __post_init__(self):
        if not isinstance(self.bases, LowRankBases):
            raise ValueError(f"bases must be a LowRankBases, got {type(self.bases).__name__}")
        check_inner(self.inner, f"{self.method} low-rank compression")
        object.__setattr__(self, "group_reduce", self.inner.group_reduce)

    @property
    def label(self) -> str:
        rk, rv = self.bases.ranks(0)
        rank = str(rk) if rk == rv else f"{rk}/{rv}"
        base = "" if self.inner.name == "full" else self.inner.label + "+"
        return f"{base}{self.method}:{rank}"

    def keeps_whole_prompt(self, prompt_len):
        return self.inner.keeps_whole_prompt(prompt_len)

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        if self.bases.head_dim != head_dim or self.bases.num_kv_heads != num_kv_heads:
            raise ValueError(f"low-rank bases are for Hkv={self.bases.num_kv_heads}, D={self.bases.head_dim}; the "
                             f"model has Hkv={num_kv_heads}, D={head_dim}")
        return init_lowrank_layer(batch, num_kv_heads, capacity, self.bases.layer(layer),
                                  self.code_dtype if self.code_dtype is not None else dtype)

    # ------------------------------------------------------------------ prefill

    def prefill(self, layer: int, cache: LowRankLayerCache, ctx: PrefillContext, *, scores=None):
        """The inner policy selects into a temporary full-precision cache; its tokens are projected."""
        tmp = self.prefill_uniform(layer, cache, ctx, scores, "low-rank compression")
        if tmp.capacity > cache.capacity:
            raise ValueError(f"keeping {tmp.capacity} tokens does not fit a cache of capacity {cache.capacity}")
        ck = encode(tmp.k, cache.enc_k).astype(cache.ck.dtype)
        cv = encode(tmp.v, cache.enc_v).astype(cache.cv.dtype)
        upd = jax.lax.dynamic_update_slice
        return cache.replace(ck=upd(cache.ck, ck, (0, 0, 0, 0)), cv=upd(cache.cv, cv, (0, 0, 0, 0)),
                             pos=upd(cache.pos, tmp.pos, (0, 0, 0)), score=upd(cache.score, tmp.score, (0, 0, 0)))

    # ------------------------------------------------------------------ decode

    def write(self, layer, cache: LowRankLayerCache, k, v, q_pos, slot, active):
        """k, v: [B, Hkv, D] -> codes written into slot[b, h]."""
        b, hk = slot.shape
        return cache.replace(
            ck=_put(cache.ck, slot, encode(k, cache.enc_k), active),
            cv=_put(cache.cv, slot, encode(v, cache.enc_v), active),
            pos=_put(cache.pos, slot, jnp.broadcast_to(q_pos[:, None], (b, hk)), active),
            score=_put(cache.score, slot, self.new_token_score(layer, k, q_pos), active))

    def attend(self, layer, cache: LowRankLayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        return lowrank_attention(q, cache.ck, cache.cv, cache.pos, q_pos, cache.dec_k, cache.dec_v,
                                 sliding_window=sliding_window, group_reduce=self.group_reduce)
