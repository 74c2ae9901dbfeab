"""One entry point per attention-side operation; picks the implementation for the cache type and
the requested backend (`impl="xla" | "pallas" | "auto"`). Generation calls only these.

`impl=None` takes the process-wide setting (`set_attention_impl`, else $PIKV_ATTENTION_IMPL, else
"auto": Pallas on TPU, XLA on CPU, XLA on GPU unless PIKV_PALLAS_GPU=1 while the GPU kernels await
their first device run; see pikv_jax/kernels/common.py). It is read at trace time, so set it before
generation compiles. Under "auto" an input a kernel does not support falls back to XLA with a logged
reason; an explicit "pallas" raises instead.

Kernels and their references take raw arrays; this module unpacks the cache layouts (cache/state.py,
cache/quantized.py) into them.
"""

from __future__ import annotations

import jax.numpy as jnp

from pikv_jax.attention import reference
from pikv_jax.cache import ops
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.cache.state import LayerCache
from pikv_jax.kernels import common
from pikv_jax.kernels import decode_attention as decode_kernel
from pikv_jax.kernels import quant_pack as quant_pack_kernel
from pikv_jax.kernels import quantized_attention as quantized_kernel
from pikv_jax.kernels import quest as quest_kernel
from pikv_jax.kernels.common import get_attention_impl, resolve_impl, set_attention_impl  # noqa: F401 - re-exported


def _kernel_wanted(impl, what: str, reason_fn) -> bool:
    """True when the Pallas kernel runs (reason_fn() is only evaluated when the kernel is requested)."""
    if resolve_impl(impl) == "xla":
        return False
    return common.choose(impl, what, reason_fn()) == "pallas"


def chunk_attention(q, k, v, q_pos, k_pos, *, sliding_window=None, mass_from=None, group_reduce="mean",
                    causal_prefix=False):
    """Prefill attention; see `reference.chunk_attention`."""
    return reference.chunk_attention(q, k, v, q_pos, k_pos, sliding_window=sliding_window, mass_from=mass_from,
                                     group_reduce=group_reduce, causal_prefix=causal_prefix)


def decode_attention(q, cache: LayerCache, q_pos, *, sliding_window=None, group_reduce="mean", impl=None):
    """One decode query per row over a layer cache -> (out [B, H, D], mass f32[B, Hkv, C])."""
    if _kernel_wanted(impl, "decode attention", lambda: decode_kernel.unsupported_reason(
            q, cache.k, cache.v, cache.pos, common.default_backend())):
        return decode_kernel.decode_attention(q, cache.k, cache.v, cache.pos, q_pos, sliding_window=sliding_window,
                                              group_reduce=group_reduce)
    return reference.decode_attention(q, cache.k, cache.v, cache.pos, q_pos, sliding_window=sliding_window,
                                      group_reduce=group_reduce)


def paged_decode_attention(q, cache: LayerCache, q_pos, pages, ok, page_size: int, *, sliding_window=None,
                           group_reduce="mean", impl=None):
    """Attention over whole pages of a uniform cache (Quest): pages i32[B, Hkv, n] and ok bool[B, Hkv, n]
    (False = filler page, skipped). Returns (out [B, H, D], mass f32[B, Hkv, n * page_size]) in page-table
    order: entry i * page_size + t is slot pages[..., i] * page_size + t."""

    def reason():
        r = decode_kernel.unsupported_reason(q, cache.k, cache.v, cache.pos, common.default_backend())
        if r is None and common.default_backend() == "triton" and not common.is_pow2(page_size):
            r = f"page_size {page_size} is not a power of two"
        return r

    if _kernel_wanted(impl, "paged decode attention", reason):
        return decode_kernel.paged_decode_attention(q, cache.k, cache.v, cache.pos, q_pos, jnp.where(ok, pages, -1),
                                                    page_size, sliding_window=sliding_window,
                                                    group_reduce=group_reduce)
    b, hk, n = pages.shape
    slots = (pages[..., None] * page_size + jnp.arange(page_size)).reshape(b, hk, n * page_size)
    take = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)
    pos = jnp.where(jnp.repeat(ok, page_size, axis=-1), jnp.take_along_axis(cache.pos, slots, axis=-1), -1)
    return reference.decode_attention(q, take(cache.k), take(cache.v), pos, q_pos, sliding_window=sliding_window,
                                      group_reduce=group_reduce)


def quest_select_pages(q, page_min, page_max, nonempty, newest, k: int, *, page_reduce="max", impl=None):
    """Quest's page choice: top-k pages by the group-reduced upper bound, the newest token's page first
    -> (pages i32[B, Hkv, k], ok bool[B, Hkv, k]); see kernels/quest.py."""

    def reason():
        d = q.shape[-1]
        if common.default_backend() == "triton" and not (common.is_pow2(d) and d >= 16):
            return f"head_dim {d} is not a power of two >= 16"
        return None

    if _kernel_wanted(impl, "quest page selection", reason):
        return quest_kernel.select_pages(q, page_min, page_max, nonempty, newest, k, page_reduce=page_reduce)
    return quest_kernel.select_reference(q, page_min, page_max, nonempty, newest, k, page_reduce)


def quantize_kv(k, v, bits: int, group_size: int, scale_dtype, *, impl=None):
    """KIVI quantize-and-pack of keys (per channel over G tokens) and values (per token over G channels)
    -> (kq, k_scale, k_min, vq, v_scale, v_min), bit-identical on either path."""
    if _kernel_wanted(impl, "quantize-and-pack", lambda: quant_pack_kernel.unsupported_reason(
            k, v, bits, group_size, scale_dtype, common.default_backend())):
        return quant_pack_kernel.quantize_kv(k, v, bits, group_size, scale_dtype)
    return quant_pack_kernel.reference(k, v, bits, group_size, scale_dtype)


def write_token(cache: LayerCache, k, v, pos, slot, active) -> LayerCache:
    """Writes one decoded token per row into `slot` (quantized caches encode it first)."""
    return ops.write_token(cache, k, v, pos, slot, active)


def quantized_decode_attention(q, cache: QuantizedLayerCache, q_pos, *, sliding_window=None, group_reduce="mean",
                               impl=None):
    """Decode attention over a KIVI cache (quantized groups + full-precision ring) -> (out [B, H, D],
    mass f32[B, Hkv, Cq + R]); the kernel and its reference take the cache's arrays."""
    arrays = (cache.kq, cache.k_scale, cache.k_min, cache.vq, cache.v_scale, cache.v_min, cache.k_res, cache.v_res,
              cache.pos)
    layout = dict(bits=cache.bits, group_size=cache.group_size)

    def reason():
        return quantized_kernel.unsupported_reason(q, cache.kq, cache.k_res, cache.v_res, cache.pos,
                                                   backend=common.default_backend(), **layout)

    fn = quantized_kernel.quantized_decode_attention
    if not _kernel_wanted(impl, "quantized decode attention", reason):
        fn = quantized_kernel.reference
    return fn(q, *arrays, q_pos, sliding_window=sliding_window, group_reduce=group_reduce, **layout)
