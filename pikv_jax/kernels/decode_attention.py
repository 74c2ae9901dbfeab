# ruff: noqa: F722
# (jaxtyping shape strings such as "b h d" are not forward references)
"""Decode attention over a slot-ordered cache that also returns the per-slot attention mass.

Reference: `pikv_jax.attention.reference.decode_attention` (re-exported here as `reference`). The
online softmax (running statistics, partials, their log-sum-exp merge) is in kernels/common.py.

One query per row against k, v: [B, Hkv, C, D], pos: i32[B, Hkv, C] (-1 = empty, slots in any
order). Returns (out [B, H, D], mass f32[B, Hkv, C]) where mass is each slot's softmax probability
reduced over the G = H / Hkv query heads of its KV head (mean / max / sum): what H2O, TOVA and LRU
accumulate. One pass over the cache:

1. Kernel (flash-decoding, split-K). Each program owns one (row, KV head) and, on GPU, one of S
   splits of the capacity. It loads its query group [G, D] once, streams key/value blocks, masks
   empty slots, slots beyond the row's last used slot, keys after the query and keys outside a
   sliding window, keeps a running max m and sum l, and writes its partial (o, m, l) plus the raw
   scaled logits f32[B, Hkv, G, C] (-inf where invisible).
2. XLA epilogue (small): merges the S partials by log-sum-exp, normalises, and turns the logits
   into probabilities exp(logit - M_g) / L_g reduced over the group.

Bytes per slot, bf16, D = 128, G = 4: the kernel reads K and V (2 * D * 2 = 512) and pos (4) and
writes G logits (16); the epilogue reads them back (16) and writes the mass (4): 552 bytes against
the 512 that plain attention must read (+8%), instead of a second pass over K. Partials are
S * G * (D + 2) * 4 bytes per (row, head): 0.4% of K/V at B = 8, 32k slots, S = 17.

Backends (the kernel bodies differ, the epilogue is shared):
- "triton" (GPU; interpret mode on CPU): grid (B, Hkv, S), masked loads so any capacity works,
  loop trip count bounded by the row's last used slot (ragged rows skip their empty tail). Needs
  a power-of-two head dim >= 16; the group is padded to 16 rows (tensor-core dot), only G rows
  of logits are stored. Optional page table (Quest): blocks gather whole pages.
- "mosaic_tpu" (TPU; TPU interpret mode on CPU): grid (B, blocks) with every KV head of a row in
  one program (bigger DMAs), running stats in VMEM scratch, the row's number of used blocks as a
  scalar-prefetch operand: the index map re-uses the last used block, so empty tails are neither
  fetched nor computed. Blocks are multiples of 128 slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Float32, Int, Shaped

from pikv_jax.attention import reference as _reference
from pikv_jax.attention.reference import visible
from pikv_jax.kernels import common
from pikv_jax.kernels.common import Partials
from pikv_jax.kernels.quest import tpu_paged_partials

reference = _reference.decode_attention


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(qpos_ref, lim_ref, q_ref, k_ref, v_ref, pos_ref, *rest, block_k: int, split_len: int, group: int,
                window: int | None, scale: float, page_size: int | None, pos_offset: int, num_pages: int):
    from jax.experimental.pallas import triton as plgpu  # lazy: platform-specific Pallas backend

    if page_size is None:
        o_ref, m_ref, l_ref, lg_ref = rest
    else:
        pages_ref, o_ref, m_ref, l_ref, lg_ref = rest
    qp = qpos_ref[()]
    lim = lim_ref[()]
    gp, d = q_ref.shape  # blocks of Gp rows over the G real ones: padding rows load as 0
    q = plgpu.load(q_ref, mask=(jnp.arange(gp) < group)[:, None], other=0)
    start0 = pl.program_id(2) * split_len
    todo = jnp.minimum(lim - start0, split_len)
    n_blocks = jnp.maximum(common.cdiv(todo, block_k), 0)
    row_ok = (jnp.arange(gp) < group)[:, None]
    cols = jnp.arange(d)

    def body(i, carry):
        acc, m, l = carry
        start = start0 + i * block_k
        in_range = start + jnp.arange(block_k) < lim  # [bk]: logits stored here (-inf where invisible)
        ok = in_range  # slots loaded
        if page_size is None:
            p = plgpu.load(pos_ref.at[pl.ds(start + pos_offset, block_k)], mask=ok, other=-1)
            k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=ok[:, None], other=0)
            v_at = v_ref.at[pl.ds(start, block_k), :]
        else:  # a block is block_k // page_size whole pages, gathered through the page table
            ppb = block_k // page_size
            first = start // page_size
            pg = plgpu.load(pages_ref.at[pl.ds(first, ppb)], mask=first + jnp.arange(ppb) < num_pages, other=-1)
            slots = pg[:, None] * page_size + jnp.arange(page_size)[None, :]
            ok = ok & jnp.broadcast_to((pg >= 0)[:, None], (ppb, page_size)).reshape(block_k)
            phys = jnp.maximum(slots.reshape(block_k), 0)
            p = plgpu.load(pos_ref.at[phys + pos_offset], mask=ok, other=-1)
            k = plgpu.load(k_ref.at[phys[:, None], cols[None, :]], mask=ok[:, None], other=0)
            v_at = v_ref.at[phys[:, None], cols[None, :]]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible(qp, p, window)[None, :], s, -jnp.inf)  # [Gp, bk]
        plgpu.store(lg_ref.at[:, pl.ds(start, block_k)], s, mask=row_ok & in_range[None, :])
        pr, alpha, m, l = common.online_update(s, m, l)
        v = plgpu.load(v_at, mask=ok[:, None], other=0)
        acc = acc * alpha + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m, l

    common.gpu_online_loop(n_blocks, body, o_ref, m_ref, l_ref)


def gpu_block_k(head_dim: int, itemsize: int) -> int:
    """Default keys per block: 64 rows of a 128-wide bf16 head (16 KiB per K or V tile)."""
    return int(max(16, min(128, common.next_pow2(16384 // (head_dim * itemsize)))))


def gpu_num_splits(batch: int, num_kv_heads: int, length: int, block_k: int, min_blocks: int = 4) -> int:
    """Splits of the capacity: about 8 programs per SM (several CTAs are resident per SM, and many
    short programs keep the last wave small), each split at least `min_blocks` blocks long."""
    target = 8 * common.gpu_core_count()
    most = max(1, common.cdiv(length, block_k * min_blocks))
    return int(max(1, min(common.cdiv(target, batch * num_kv_heads), most)))


def gpu_split_grid(batch: int, num_kv_heads: int, length: int, block_k: int, num_splits: int | None):
    """(splits, split_len): `length` slots cut into splits of whole blocks, none of them empty."""
    splits = num_splits or gpu_num_splits(batch, num_kv_heads, length, block_k)
    split_len = common.cdiv(common.cdiv(length, splits), block_k) * block_k
    return common.cdiv(length, split_len), split_len


def gpu_spec(*shape):
    """BlockSpec of one (row, KV head) program of a (B, Hkv, S) grid: the whole of `shape`."""
    return pl.BlockSpec((None, None) + shape, lambda i, j, s: (i, j) + (0,) * len(shape))


def gpu_partial_outputs(batch: int, num_kv_heads: int, splits: int, group: int, rows: int, head_dim: int,
                        length: int):
    """(out_specs, out_shape) of a split-K Triton call: o f32[B, Hkv, S, G, D], m and l f32[B, Hkv, S, G]
    and logits f32[B, Hkv, G, N], written in blocks of `rows` >= G rows masked to the G real ones."""
    split = lambda *shape: pl.BlockSpec((None, None, None) + shape, lambda i, j, s: (i, j, s) + (0,) * len(shape))
    stat = jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group), jnp.float32)
    specs = [split(rows, head_dim), split(rows), split(rows), gpu_spec(rows, length)]
    shapes = [jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32), stat, stat,
              jax.ShapeDtypeStruct((batch, num_kv_heads, group, length), jnp.float32)]
    return specs, shapes


def _gpu_partials(q, k, v, pos, qpos, limit, *, window, interpret, block_k, num_splits, num_warps, num_stages,
                  pages=None, page_size=None, pos_offset=0) -> Partials:
    b, h, d = q.shape
    hk, c = k.shape[1], k.shape[2]
    g = h // hk
    gp = max(common.GPU_MIN_ROWS, common.next_pow2(g))
    n = c if pages is None else pages.shape[-1] * page_size  # slots in this view
    bk = block_k or gpu_block_k(d, k.dtype.itemsize)
    if page_size is not None:
        bk = max(bk, page_size)
    splits, split_len = gpu_split_grid(b, hk, n, bk, num_splits)
    kernel = functools.partial(_gpu_kernel, block_k=bk, split_len=split_len, group=g, window=window,
                               scale=d ** -0.5, page_size=page_size, pos_offset=pos_offset,
                               num_pages=0 if pages is None else pages.shape[-1])
    in_specs = [gpu_spec(), gpu_spec(), gpu_spec(gp, d), gpu_spec(c, d), gpu_spec(c, d), gpu_spec(pos.shape[-1])]
    args = [qpos, limit, q.reshape(b, hk, g, d), k, v, pos]
    if pages is not None:
        in_specs.append(gpu_spec(pages.shape[-1]))
        args.append(pages)
    out_specs, out_shape = gpu_partial_outputs(b, hk, splits, g, gp, d, n)
    o, m, l, logits = pl.pallas_call(
        kernel,
        grid=(b, hk, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.gpu_compiler_params(num_warps or 4, num_stages or 2),
        interpret=common.interpret_arg("triton", interpret),
        name="pikv_decode_attention",
    )(*args)
    return Partials(o, m, l, logits, limit)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(nblk_ref, qpos_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_ref, l_ref, lg_ref, acc_sc, m_sc, l_sc, *,
                block_k: int, capacity: int, group: int, window: int | None, scale: float):
    b, j = pl.program_id(0), pl.program_id(1)
    hk = q_ref.shape[0]
    common.tpu_online_begin(j == 0, acc_sc, m_sc, l_sc)
    active = j < nblk_ref[b]

    @pl.when(active)
    def _step():
        in_range, row_in_range = common.tpu_block_in_range(j, block_k, capacity)
        for h in range(hk):
            vis = visible(qpos_ref[b, h], pos_ref[pl.ds(h, 1), :], window) & in_range  # [1, bk]
            s = jax.lax.dot_general(q_ref[h], k_ref[h], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale  # [Gp, bk]
            s = jnp.where(vis, s, -jnp.inf)
            lg_ref[h] = s[:group]
            p, alpha, m_new, l_new = common.online_update(s, m_sc[h][:, :1], l_sc[h][:, :1])
            v = v_ref[h]
            if capacity % block_k:  # the last block is padded with unspecified data
                v = jnp.where(row_in_range, v, jnp.zeros_like(v))
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_sc[h] = acc_sc[h] * alpha + pv
            m_sc[h] = jnp.broadcast_to(m_new, m_sc.shape[1:])
            l_sc[h] = jnp.broadcast_to(l_new, l_sc.shape[1:])

    common.tpu_skip_logits(active, lg_ref)
    common.tpu_online_end(j == pl.num_programs(1) - 1, acc_sc, m_sc, l_sc, o_ref, m_ref, l_ref)


def tpu_block_k(capacity: int, num_kv_heads: int, head_dim: int, itemsize: int, budget: int = 8 << 20) -> int:
    """Slots per block: a multiple of 128 (lanes of pos and logits) such that the double-buffered
    K and V blocks of all KV heads stay under `budget` bytes of VMEM; the whole capacity if smaller."""
    per_slot = num_kv_heads * head_dim * itemsize * 2 * 2
    bk = max(128, min(512, (budget // per_slot) // 128 * 128))
    return capacity if capacity <= bk else bk


def _tpu_partials(q, k, v, pos, qpos, limit, *, window, interpret, block_k) -> Partials:
    from jax.experimental.pallas import tpu as pltpu  # lazy: platform-specific Pallas backend

    b, h, d = q.shape
    hk, c = k.shape[1], k.shape[2]
    g = h // hk
    gp = common.cdiv(g, common.TPU_MIN_ROWS) * common.TPU_MIN_ROWS
    bk = block_k or tpu_block_k(c, hk, d, k.dtype.itemsize)
    nb = common.cdiv(c, bk)
    nblk = common.cdiv(jnp.max(limit, axis=1), bk)  # used blocks per row

    def kv_map(i, j, nblk_ref, qpos_ref):
        return i, 0, common.used_block(j, nblk_ref[i]), 0

    def pos_map(i, j, nblk_ref, qpos_ref):
        return i, 0, common.used_block(j, nblk_ref[i])

    row = lambda *shape: pl.BlockSpec((None,) + shape, lambda i, j, *_: (i,) + (0,) * len(shape))
    f32 = jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, nb),
        in_specs=[row(hk, gp, d), pl.BlockSpec((None, hk, bk, d), kv_map), pl.BlockSpec((None, hk, bk, d), kv_map),
                  pl.BlockSpec((None, hk, bk), pos_map)],
        out_specs=[row(hk, gp, d), row(hk, gp, 128), row(hk, gp, 128),
                   pl.BlockSpec((None, hk, g, bk), lambda i, j, *_: (i, 0, 0, j))],
        scratch_shapes=[pltpu.VMEM((hk, gp, d), f32), pltpu.VMEM((hk, gp, 128), f32), pltpu.VMEM((hk, gp, 128), f32)],
    )
    kernel = functools.partial(_tpu_kernel, block_k=bk, capacity=c, group=g, window=window, scale=d ** -0.5)
    o, m, l, logits = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hk, gp, d), f32), jax.ShapeDtypeStruct((b, hk, gp, 128), f32),
                   jax.ShapeDtypeStruct((b, hk, gp, 128), f32), jax.ShapeDtypeStruct((b, hk, g, c), f32)],
        compiler_params=common.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=common.interpret_arg("mosaic_tpu", interpret),
        name="pikv_decode_attention_tpu",
    )(nblk.astype(jnp.int32), qpos, common.group_query(q, hk, gp), k, v, pos)
    return common.tpu_partials(o, m, l, logits, limit)


# ---------------------------------------------------------------------------------------------
# Entry points


def unsupported_reason(q, k, v, pos, backend: str) -> str | None:
    """None when the kernel handles these inputs, else the rule they break."""
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or pos.shape != k.shape[:3]:
        return f"shapes q {q.shape}, k {k.shape}, v {v.shape}, pos {pos.shape} are not [B,H,D], [B,Hkv,C,D], [B,Hkv,C]"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in common.FLOAT_DTYPES:
            return f"{name} dtype {x.dtype} (allowed: float32, bfloat16, float16)"
    d = q.shape[-1]
    if backend == "triton" and (not common.is_pow2(d) or d < 16):
        return f"head_dim {d} is not a power of two >= 16 (Triton tiles)"
    if backend == "mosaic_tpu" and jnp.dtype(k.dtype) == jnp.float16:
        return "float16 caches are not supported on TPU"
    return None


def decode_partials(q, k, v, pos, q_pos, *, sliding_window=None, backend=None, interpret=None, limit=None,
                    block_k=None, num_splits=None, num_warps=None, num_stages=None) -> Partials:
    """Kernel pass only (see module docstring); `limit` defaults to `slot_limit(pos)`."""
    backend, interpret = common.resolve_backend(backend, interpret)
    reason = unsupported_reason(q, k, v, pos, backend)
    if reason:
        raise common.KernelUnsupported(f"decode attention: {reason}")
    b, hk = k.shape[:2]
    qpos = common.q_positions(q_pos, b, hk)
    limit = common.slot_limit(pos) if limit is None else jnp.asarray(limit, jnp.int32)
    if backend == "triton":
        return _gpu_partials(q, k, v, pos, qpos, limit, window=sliding_window, interpret=interpret, block_k=block_k,
                             num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
    return _tpu_partials(q, k, v, pos, qpos, limit, window=sliding_window, interpret=interpret, block_k=block_k)


class _Config(NamedTuple):
    """Static part of a decode_attention call (hashable: a custom_vjp non-differentiable argument)."""

    window: int | None
    group_reduce: str
    backend: str | None
    interpret: bool | None
    tuning: tuple


def _forward(q, k, v, pos, q_pos, cfg: _Config):
    parts = decode_partials(q, k, v, pos, q_pos, sliding_window=cfg.window, backend=cfg.backend,
                            interpret=cfg.interpret, **dict(cfg.tuning))
    return common.finish([parts], group=q.shape[1] // k.shape[1], group_reduce=cfg.group_reduce, out_dtype=q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, pos, q_pos, cfg: _Config):
    return _forward(q, k, v, pos, q_pos, cfg)


def _attend_fwd(q, k, v, pos, q_pos, cfg):
    return _forward(q, k, v, pos, q_pos, cfg), (q, k, v, pos, q_pos)


def _attend_bwd(cfg, res, cotangents):
    """Gradients (of out and of mass) by the reference's VJP: jax.grad cannot go through pallas_call."""
    q, k, v, pos, q_pos = res
    fn = functools.partial(reference, sliding_window=cfg.window, group_reduce=cfg.group_reduce)
    _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pos, q_pos), q, k, v)
    return (*vjp(cotangents), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def decode_attention(q: Float[Array, "b h d"], k: Shaped[Array, "b hk c d"], v: Shaped[Array, "b hk c d"],
                     pos: Int[Array, "b hk c"], q_pos: Int[Array, " b"] | Int[Array, "b hk"], *,
                     sliding_window: int | None = None, group_reduce: str = "mean", backend: str | None = None,
                     interpret: bool | None = None, **tuning) -> tuple[Float[Array, "b h d"], Float32[Array, "b hk c"]]:
    """Pallas decode attention with per-slot mass: same contract as `reference`.

    pos: -1 = empty slot. Returns (out in q's dtype, mass). `tuning`: block_k, num_splits, num_warps,
    num_stages (GPU) or block_k (TPU); defaults are chosen from the shapes. k and v may hold any
    dtype here so that an unsupported one raises KernelUnsupported naming the allowed dtypes.
    Differentiable in q, k, v (custom_vjp; the backward pass is the reference's, in XLA).
    """
    if group_reduce not in _reference.GROUP_REDUCTIONS:
        raise ValueError(f"group_reduce={group_reduce!r}; allowed: {_reference.GROUP_REDUCTIONS}")
    cfg = _Config(sliding_window, group_reduce, backend, interpret, tuple(sorted(tuning.items())))
    return _attend(q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(q_pos, jnp.int32), cfg)


def paged_decode_attention(q: Float[Array, "b h d"], k: Shaped[Array, "b hk c d"], v: Shaped[Array, "b hk c d"],
                           pos: Int[Array, "b hk c"], q_pos: Int[Array, " b"] | Int[Array, "b hk"],
                           pages: Int[Array, "b hk n"], page_size: int, *, sliding_window: int | None = None,
                           group_reduce: str = "mean", backend: str | None = None, interpret: bool | None = None,
                           block_k: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None) -> tuple[Float[Array, "b h d"], Float32[Array, "b hk m"]]:
    """Attention over the pages listed in `pages` (-1 = skip) of a uniform cache (Quest).

    Returns (out, mass) with m = n * page_size entries in page-table order: mass[b, h, i * page_size
    + t] belongs to slot pages[b, h, i] * page_size + t. Same contract as `decode_attention` otherwise."""
    backend, interpret = common.resolve_backend(backend, interpret)
    reason = unsupported_reason(q, k, v, pos, backend)
    if reason is None and backend == "triton" and not common.is_pow2(page_size):
        reason = f"page_size {page_size} is not a power of two"
    if reason:
        raise common.KernelUnsupported(f"paged decode attention: {reason}")
    b, h, _ = q.shape
    hk = k.shape[1]
    qpos = common.q_positions(q_pos, b, hk)
    n = pages.shape[-1] * page_size
    pages = jnp.asarray(pages, jnp.int32)
    if backend == "triton":
        limit = jnp.full((b, hk), n, jnp.int32)
        parts = _gpu_partials(q, k, v, pos, qpos, limit, window=sliding_window, interpret=interpret,
                              block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                              pages=pages, page_size=page_size)
    else:
        parts = tpu_paged_partials(q, k, v, pos, qpos, pages, page_size, window=sliding_window, interpret=interpret)
    return common.finish([parts], group=h // hk, group_reduce=group_reduce, out_dtype=q.dtype)
