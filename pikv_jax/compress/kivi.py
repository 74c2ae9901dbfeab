"""KIVI quantized KV cache (Liu et al., 2024) as a cache layout, composable with any eviction policy.

Layout of one layer (per row b and KV head h; pikv_jax/cache/quantized.py):
- a quantized region of Cq slots in groups of G tokens: key codes quantized per channel over the
  group's G tokens, value codes per token over groups of G channels, packed (2 x int4 or
  4 x int2 per byte), with scales and minimums;
- a residual ring of R slots holding the newest tokens in `ring_dtype` (bfloat16 by default).
A cache of at most R tokens (a small budget or a short sequence) is a ring of that many
full-precision slots and no groups.

Decode: a token enters the ring. When the ring is full, its G oldest tokens are quantized
together and moved into a free group. When no group is free, an evicting policy (ring with groups):
1. frees the group with the lowest total eviction score among groups holding no protected token
   (sink or recent window): quantized storage evicts whole groups, since a group shares its key
   scales;
2. when every group holds a protected token, evicts the ring's oldest token instead, if that one
   is unprotected (no flush this step);
3. otherwise no token may go: the row reports full (`ok` False) rather than evict a protected token.
A ring-only cache evicts the lowest-scored unprotected slot (the same rule 3 applies). A
non-evicting policy reports the row full when neither the ring nor a group has room. Keys are
quantized after RoPE.

Attention dequantizes the quantized region and attends over it together with the ring
(`attend`); the fused kernel path is in pikv_jax/kernels. Positions cover all Cq + R slots, and so
do scores when the wrapped policy's eviction reads them (`stores_scores`), so its `observe` and
`eviction_scores` work unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.attention import dispatch
from pikv_jax.cache.policies.base import PrefillContext, protected_mask
from pikv_jax.cache.policies.streaming_llm import StreamingLLM
from pikv_jax.cache.quantized import QuantizedLayerCache, init_quantized_layer
from pikv_jax.cache.state import EMPTY, LayerCache
from pikv_jax.compress.wrapper import WrapperPolicy, check_decode_scores, decode_owner
from pikv_jax.intmath import round_up
from pikv_jax.kernels import quant


def _take(x, idx):
    """x [B, Hkv, N, ...], idx [B, Hkv, M] -> [B, Hkv, M, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)


def _put(x, idx, values, where):
    """x[b, h, idx[b, h, m]] = values[b, h, m] where `where` [B, Hkv, M] (else unchanged)."""
    n = x.shape[2]
    b, hk, m = idx.shape
    idx = jnp.where(where, idx, n)  # out of range -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hk)[None, :, None]
    return x.at[bi, hi, idx].set(values.astype(x.dtype), mode="drop")


def default_group_size(bits: int) -> int:
    """KIVI's 32 below 8 bits; 64 at 8 bits, where per-group float16 metadata would otherwise cost
    an eighth of the codes (see QuantizedPolicy)."""
    return 64 if bits == 8 else 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedPolicy(WrapperPolicy):
    """KIVI quantization around an eviction policy (`inner`, default Full; it keeps budgets).

    bits: 2, 4 or 8. group_size G: tokens per key group and channels per value group; must divide
    the head dimension and residual_length. Default 32 (KIVI's) for 2 and 4 bits and 64 for 8 bits:
    with G = 32 the float16 scale and minimum per group cost 1 bit per element, which caps int8 at
    16/9 = 1.78x fewer bytes than bf16; G = 64 lifts the cap to 1.88x at no measurable loss (int8
    codes have 256 levels). residual_length R (default 64, a multiple of G): newest tokens kept
    in full precision; KIVI's paper uses 128, but 128 bf16 ring slots alone hold int4 to 2.99x at
    4k tokens, and R = 64 measured the same perplexity and passkey on SmolLM2
    (benchmarks/kivi-compact.json). scale_dtype: storage of scales and minimums
    (float16 as in KIVI; float32 for exactness studies). ring_dtype: storage of the ring
    (bfloat16, the precision the models are trained in; None = the model's dtype).

    Under a `seq` mesh axis the quantized groups split over devices and the ring and the score row
    [Cq + R] stay replicated: without scores (Full inside) a decode step moves only [B, H, D]-sized
    partials, but an inner policy that scores slots (H2O, TOVA, ...) redistributes its f32[B, Hkv,
    Cq + R] score row at every step (all-to-alls, O(B * Hkv * C) bytes; tests/test_seq_sharded_generate.py).
    """

    name: ClassVar[str] = "kivi"
    layout: ClassVar[str] = "kivi"
    bits: int = 4
    group_size: int | None = None
    residual_length: int = 64
    scale_dtype: Any = jnp.float16
    ring_dtype: Any = jnp.bfloat16

    def __post_init__(self):
        quant.check_bits(self.bits)
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.bits))
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.residual_length < self.group_size or self.residual_length % self.group_size:
            raise ValueError(f"residual_length={self.residual_length} must be a positive multiple of "
                             f"group_size={self.group_size}")
        if self.inner.stores_raw_keys:
            raise ValueError("quantization stores keys after RoPE; it cannot wrap a policy that re-indexes positions")
        check_decode_scores(self.inner, "quantization")
        if self.inner.layout != "uniform":
            raise ValueError(f"quantization cannot wrap {self.inner.label} (it stores its own {self.inner.layout} "
                             f"layout); allowed: policies of the uniform layout (h2o, snapkv, tova, kvzip, "
                             f"expected_attention, streaming_llm, ...)")
        object.__setattr__(self, "group_reduce", self.inner.group_reduce)

    @property
    def label(self) -> str:
        base = "" if self.inner.name == "full" else self.inner.label + "+"
        return f"{base}int{self.bits}"

    @property
    def stores_scores(self) -> bool:
        """The wrapped policy's eviction reads per-slot scores (a non-evicting policy never does;
        StreamingLLM ranks by position)."""
        return self.inner.evicts and not isinstance(decode_owner(self.inner), StreamingLLM)

    @property
    def implicit_positions(self) -> bool:
        """Every token is kept in order (no budget, no eviction): quantized slot i holds position i."""
        return self.inner.name == "full" and not self.inner.has_budget and not self.inner.evicts

    def check_head_dim(self, head_dim: int):
        if head_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the head dimension {head_dim}")
        if head_dim * self.bits % 8:
            raise ValueError(f"head dimension {head_dim} cannot be packed at {self.bits} bits")

    # ------------------------------------------------------------------ sizes

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        self.check_head_dim(head_dim)
        return init_quantized_layer(batch, num_kv_heads, capacity, head_dim, dtype, bits=self.bits,
                                    group_size=self.group_size, residual_length=self.residual_length,
                                    scale_dtype=self.scale_dtype, ring_dtype=self.ring_dtype,
                                    implicit_positions=self.implicit_positions, scores=self.stores_scores)

    # ------------------------------------------------------------------ prefill

    def prefill(self, layer: int, cache: QuantizedLayerCache, ctx: PrefillContext, *, scores=None):
        """The inner policy selects (into a temporary full-precision cache, chronological), then the
        oldest ceil(max(n - R, 0) / G) * G kept tokens are quantized and the rest go to the ring."""
        tmp = self.prefill_uniform(layer, cache, ctx, scores, f"int{self.bits} quantization")
        return self.from_uniform(cache, tmp)

    def from_uniform(self, cache: QuantizedLayerCache, tmp: LayerCache) -> QuantizedLayerCache:
        """Moves a chronological full-precision cache (empties last) into the quantized layout."""
        g, r, cq = self.group_size, cache.residual_slots, cache.quantized_slots
        n = jnp.sum(tmp.pos >= 0, axis=-1)  # [B, Hkv]
        nq = jnp.minimum(round_up(jnp.maximum(n - r, 0), g), cq)
        kept = tmp.capacity
        scored = cache.has_scores
        # quantized region: kept tokens [0, nq) in place (slot i = kept index i)
        width = min(cq, round_up(kept, g))
        if width > 0:
            pad = width - min(kept, width)
            kx = jnp.pad(tmp.k[:, :, :width], ((0, 0), (0, 0), (0, pad), (0, 0)))
            vx = jnp.pad(tmp.v[:, :, :width], ((0, 0), (0, 0), (0, pad), (0, 0)))
            kq, ks, km, vq, vs, vm = dispatch.quantize_kv(kx, vx, self.bits, g, self.scale_dtype)
            upd = jax.lax.dynamic_update_slice
            cache = cache.replace(kq=upd(cache.kq, kq, (0, 0, 0, 0)), k_scale=upd(cache.k_scale, ks, (0, 0, 0, 0)),
                                  k_min=upd(cache.k_min, km, (0, 0, 0, 0)), vq=upd(cache.vq, vq, (0, 0, 0, 0)),
                                  v_scale=upd(cache.v_scale, vs, (0, 0, 0, 0)),
                                  v_min=upd(cache.v_min, vm, (0, 0, 0, 0)))
            in_q = jnp.arange(width)[None, None] < nq[..., None]
            if not cache.implicit_positions:
                qpos = jnp.pad(tmp.pos[:, :, :width], ((0, 0), (0, 0), (0, pad)), constant_values=EMPTY)
                cache = cache.replace(qpos=cache.qpos.at[:, :, :width].set(jnp.where(in_q, qpos, EMPTY)))
            if scored:
                qscore = jnp.pad(tmp.score[:, :, :width], ((0, 0), (0, 0), (0, pad)))
                cache = cache.replace(score=cache.score.at[:, :, :width].set(jnp.where(in_q, qscore, 0.0)))
        # ring: kept tokens [nq, n) -> ring slots [0, n - nq)
        j = jnp.arange(r)[None, None]
        src = jnp.minimum(nq[..., None] + j, kept - 1)
        in_ring = j < (n - nq)[..., None]
        if scored:
            cache = cache.replace(score=cache.score.at[:, :, cq:].set(jnp.where(in_ring, _take(tmp.score, src), 0.0)))
        return cache.replace(
            k_res=jnp.where(in_ring[..., None], _take(tmp.k, src), 0).astype(cache.k_res.dtype),
            v_res=jnp.where(in_ring[..., None], _take(tmp.v, src), 0).astype(cache.v_res.dtype),
            ring_pos=jnp.where(in_ring, _take(tmp.pos, src), EMPTY),
            q_count=nq.astype(jnp.int32), ring_start=jnp.zeros_like(n, jnp.int32),
            ring_count=(n - nq).astype(jnp.int32))

    # ------------------------------------------------------------------ decode

    def has_room(self, layer, cache: QuantizedLayerCache):
        if self.inner.evicts:
            return jnp.ones((cache.batch,), bool)
        ring_free = cache.ring_count < cache.residual_slots
        return jnp.all(ring_free | jnp.any(self._free_groups(cache), axis=-1), axis=-1)

    def _free_groups(self, cache):
        """bool[B, Hkv, Cq/G]: every slot of the group is empty."""
        qpos = cache.quantized_pos
        return jnp.all(qpos.reshape(qpos.shape[:2] + (-1, self.group_size)) < 0, axis=-1)

    def _unprotected_scores(self, layer, cache, q_pos):
        """f32[B, Hkv, Cq + R]: the inner policy's eviction scores, +inf on protected or empty slots."""
        pos = cache.pos
        keep = protected_mask(pos, q_pos, self.inner.n_sink, self.inner.recent_window(cache.capacity))
        return jnp.where(keep | (pos < 0), jnp.inf, self.inner.eviction_scores(layer, cache, q_pos))

    def _victim_group(self, layer, cache, q_pos):
        """(i32[B, Hkv] the quantized group with the lowest total eviction score among groups holding
        no protected token, bool[B, Hkv] such a group exists)."""
        g, cq = self.group_size, cache.quantized_slots
        pos = cache.quantized_pos
        scores = self.inner.eviction_scores(layer, cache, q_pos)[:, :, :cq]
        keep = protected_mask(pos, q_pos, self.inner.n_sink, self.inner.recent_window(cache.capacity))
        grp = lambda x: x.reshape(x.shape[:2] + (-1, g))
        total = jnp.sum(jnp.where(grp(pos >= 0), grp(scores), 0.0), axis=-1)
        total = jnp.where(jnp.any(grp(keep), axis=-1), jnp.inf, total)
        return jnp.argmin(total, axis=-1).astype(jnp.int32), jnp.min(total, axis=-1) < jnp.inf

    def decode_slot(self, layer, cache: QuantizedLayerCache, q_pos):
        """Makes room in the ring when it is full (a flush into a free or freed group, or for an
        evicting policy one evicted token; see the module docstring); returns (cache, the slot for
        the new token as a global index: Cq + ring index, ok bool[B])."""
        r, cq = cache.residual_slots, cache.quantized_slots
        ring_full = cache.ring_count >= r  # [B, Hkv]
        if cq == 0:
            slot = (cache.ring_start + cache.ring_count) % r
            if not self.inner.evicts:
                return cache, slot.astype(jnp.int32), jnp.all(~ring_full, axis=-1)
            scores = self._unprotected_scores(layer, cache, q_pos)
            found = jnp.min(scores, axis=-1) < jnp.inf
            ok = jnp.all(~ring_full | found, axis=-1)
            evict = ring_full & found & ok[:, None]
            victim = jnp.argmin(scores, axis=-1).astype(jnp.int32)
            first_empty = jnp.argmax(cache.ring_pos < 0, axis=-1)  # slots are not in ring order once one is evicted
            cache = self._drop(cache, victim, evict)
            return cache, jnp.where(ring_full, victim, first_empty).astype(jnp.int32), ok
        if not self.inner.evicts:
            can_flush = jnp.any(self._free_groups(cache), axis=-1)
            flush = ring_full & can_flush
            cache = jax.lax.cond(jnp.any(flush), lambda c: self._flush(c, flush, jnp.argmax(
                self._free_groups(c), axis=-1).astype(jnp.int32)), lambda c: c, cache)
            ok = jnp.all(~ring_full | can_flush, axis=-1)
        else:
            def make_room(c):  # only when a ring is full: a branch, not masked work on every step
                free = self._free_groups(c)
                has_free = jnp.any(free, axis=-1)
                victim, found = self._victim_group(layer, c, q_pos)
                to_group = has_free | found
                oldest = jnp.take_along_axis(c.ring_pos, c.ring_start[..., None], axis=-1)[..., 0]
                oldest_free = ~protected_mask(oldest, q_pos, self.inner.n_sink,
                                              self.inner.recent_window(c.capacity))
                okh = ~ring_full | to_group | oldest_free
                ok = jnp.all(okh, axis=-1)
                c = self._flush(c, ring_full & to_group, jnp.where(has_free, jnp.argmax(free, axis=-1), victim))
                return self._drop(c, cq + c.ring_start, ring_full & ~to_group & oldest_free & ok[:, None]), ok

            cache, ok = jax.lax.cond(jnp.any(ring_full), make_room,
                                     lambda c: (c, jnp.ones((c.batch,), bool)), cache)
        slot = cq + (cache.ring_start + cache.ring_count) % r
        return cache, slot.astype(jnp.int32), ok

    def _drop(self, cache: QuantizedLayerCache, slot, where) -> QuantizedLayerCache:
        """Evicts ring slot `slot` (global index, i32[B, Hkv]) where `where`; the ring's count goes
        down by one (and its start moves on when the slot is the oldest), so the next write fills it."""
        cq, r = cache.quantized_slots, cache.residual_slots
        ring = (slot - cq)[..., None]
        w = where[..., None]
        cache = cache.replace(ring_pos=_put(cache.ring_pos, ring, jnp.full(ring.shape, EMPTY), w))
        if cache.has_scores:
            cache = cache.replace(score=_put(cache.score, slot[..., None], jnp.zeros(ring.shape), w))
        oldest = where & (slot - cq == cache.ring_start)
        return cache.replace(ring_start=jnp.where(oldest, (cache.ring_start + 1) % r, cache.ring_start),
                             ring_count=jnp.where(where, cache.ring_count - 1, cache.ring_count))

    def _flush(self, cache: QuantizedLayerCache, flush, target):
        """Quantizes the G oldest ring tokens of (row, head) pairs where `flush`, into group `target`
        (whose previous tokens, if any, are evicted)."""
        g, r, cq = self.group_size, cache.residual_slots, cache.quantized_slots
        ring_idx = (cache.ring_start[..., None] + jnp.arange(g)[None, None]) % r  # [B, Hkv, G]
        k = _take(cache.k_res, ring_idx).astype(jnp.float32)  # [B, Hkv, G, D]
        v = _take(cache.v_res, ring_idx).astype(jnp.float32)
        pos = _take(cache.ring_pos, ring_idx)
        kq, ks, km, vq, vs, vm = dispatch.quantize_kv(k, v, self.bits, g, self.scale_dtype)  # ks, km: [B, Hkv, 1, D]
        dst = target[..., None] * g + jnp.arange(g)[None, None]  # [B, Hkv, G] quantized slots
        fl = jnp.broadcast_to(flush[..., None], dst.shape)
        cache = cache.replace(
            kq=_put(cache.kq, dst, kq, fl), vq=_put(cache.vq, dst, vq, fl),
            v_scale=_put(cache.v_scale, dst, vs, fl), v_min=_put(cache.v_min, dst, vm, fl),
            k_scale=_put(cache.k_scale, target[..., None], ks, flush[..., None]),
            k_min=_put(cache.k_min, target[..., None], km, flush[..., None]),
            ring_pos=_put(cache.ring_pos, ring_idx, jnp.full(ring_idx.shape, EMPTY), fl))
        if cache.implicit_positions:  # groups fill in order and are never freed
            cache = cache.replace(q_count=jnp.where(flush, cache.q_count + g, cache.q_count))
        else:
            qpos = _put(cache.qpos, dst, pos, fl)
            cache = cache.replace(qpos=qpos, q_count=jnp.sum(qpos >= 0, axis=-1).astype(jnp.int32))
        if cache.has_scores:
            score = _take(cache.score[:, :, cq:], ring_idx)
            score = _put(_put(cache.score, dst, score, fl), cq + ring_idx, jnp.zeros(ring_idx.shape), fl)
            cache = cache.replace(score=score)
        return cache.replace(ring_start=jnp.where(flush, (cache.ring_start + g) % r, cache.ring_start),
                             ring_count=jnp.where(flush, cache.ring_count - g, cache.ring_count))

    def write(self, layer, cache: QuantizedLayerCache, k, v, q_pos, slot, active):
        cq = cache.quantized_slots
        b, hk = slot.shape
        act = jnp.broadcast_to(active[:, None], (b, hk))
        ring = (slot - cq)[..., None]
        cache = cache.replace(
            k_res=_put(cache.k_res, ring, k[:, :, None], act[..., None]),
            v_res=_put(cache.v_res, ring, v[:, :, None], act[..., None]),
            ring_pos=_put(cache.ring_pos, ring, jnp.broadcast_to(q_pos[:, None, None], (b, hk, 1)), act[..., None]))
        if cache.has_scores:
            score = self.inner.new_token_score(layer, k, q_pos)
            cache = cache.replace(score=_put(cache.score, slot[..., None], score[..., None], act[..., None]))
        return cache.replace(ring_count=jnp.where(act, cache.ring_count + 1, cache.ring_count))

    def observe(self, layer, cache: QuantizedLayerCache, mass, q_pos, active):
        """The inner policy folds the attention mass into the scores, when they are stored."""
        return self.inner.observe(layer, cache, mass, q_pos, active) if cache.has_scores else cache

    def attend(self, layer, cache: QuantizedLayerCache, q, q_pos, *, sliding_window=None, inv_freq=None):
        return dispatch.quantized_decode_attention(q, cache, q_pos, sliding_window=sliding_window,
                                                   group_reduce=self.group_reduce)
