# ruff: noqa: F722
# (jaxtyping shape strings such as "b h d" are not forward references)
"""Quest kernels: page upper bounds with top-k page selection, and attention over the selected pages.

References (pure jnp): `select_reference` below (`page_upper_bound` + reduce_group + lax.top_k,
exactly what the policy `Quest.select_pages` in cache/policies/quest.py does, on the same
`page_upper_bound`) and `pikv_jax.attention.reference.decode_attention` over the gathered pages.

1. `select_pages(q, page_min, page_max, nonempty, newest, k)`: one program per (row, KV head)
   computes U[g, n] = q+ . max_n + q- . min_n for every page (two [G, D] x [D, N] dots in f32),
   reduces U over the group (max / mean / sum), forces the newest token's page to +inf, empty pages
   to -inf, and selects the top k pages in order (k rounds of max + lowest index among ties, the
   order lax.top_k gives). It reads the page bounds once (2 * D * 4 / page_size bytes per token:
   64 for D = 128, 1/8 of the bf16 K/V bytes) and writes k indices: the XLA path materialises
   U [B, Hkv, G, N] and runs a sort-based top_k over it.
2. Attention over the selected pages: on GPU the decode kernel gathers whole pages through the page
   table (decode_attention.paged_decode_attention); on TPU `tpu_paged_partials` below walks the pages
   with the page table in scalar prefetch, one page per grid step (index map = page id), so only the
   selected K/V pages are ever read (no gathered copy as in the XLA path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Bool, Float, Float32, Int

from pikv_jax.attention.reference import GROUP_REDUCTIONS, reduce_group, visible
from pikv_jax.kernels import common


def page_upper_bound(q: Float[Array, "b hk g d"], page_min: Float[Array, "b hk n d"],
                     page_max: Float[Array, "b hk n d"],
                     nonempty: Bool[Array, "b hk n"] | None = None) -> Float32[Array, "b hk g n"]:
    """U = sum_c max(q_c min_c, q_c max_c) per query head and page: an upper bound of q . k for
    every key k of the page (Quest). Empty pages (nonempty False) get -inf."""
    q = q.astype(jnp.float32)
    if nonempty is not None:
        page_min = jnp.where(nonempty[..., None], page_min, 0.0)
        page_max = jnp.where(nonempty[..., None], page_max, 0.0)
    u = (jnp.einsum("bhgd,bhnd->bhgn", jnp.maximum(q, 0.0), page_max)
         + jnp.einsum("bhgd,bhnd->bhgn", jnp.minimum(q, 0.0), page_min))
    if nonempty is not None:
        u = jnp.where(nonempty[:, :, None, :], u, -jnp.inf)
    return u


def select_reference(q: Float[Array, "b h d"], page_min: Float[Array, "b hk n d"], page_max: Float[Array, "b hk n d"],
                     nonempty: Bool[Array, "b hk n"], newest: Int[Array, "b hk"], k: int,
                     page_reduce: str = "max") -> tuple[Int[Array, "b hk s"], Bool[Array, "b hk s"]]:
    """Top-k pages per (row, KV head) by the group-reduced page bound, the newest token's page
    (`newest`, -1 = none) forced first and empty pages last -> (pages, ok: False = filler page),
    s = k entries in order of the bound."""
    b, h, d = q.shape
    hk, n = nonempty.shape[1:]
    u = reduce_group(page_upper_bound(q.reshape(b, hk, h // hk, d), page_min, page_max, nonempty), page_reduce, axis=2)
    force = (jnp.arange(n)[None, None, :] == newest[..., None]) & nonempty
    top, pages = jax.lax.top_k(jnp.where(force, jnp.inf, u), k)
    return pages.astype(jnp.int32), top > -jnp.inf


def _scores(q, mn, mx, ne, newest, *, group: int, page_reduce: str):
    """Group-reduced page bounds r f32[1, N] (forced page +inf, empty pages -inf) and page ids [1, N].

    q [Gp, D] (rows >= group are padding); mn, mx [N, D]; ne bool[1, N]. Empty pages hold +inf / -inf
    bounds, whose products may be nan: only their own column, which the final select replaces."""
    gp = q.shape[0]
    n = mn.shape[0]
    hi = jax.lax.Precision.HIGHEST
    q = q.astype(jnp.float32)
    dims = (((1,), (1,)), ((), ()))
    u = (jax.lax.dot_general(jnp.maximum(q, 0.0), mx, dims, preferred_element_type=jnp.float32, precision=hi)
         + jax.lax.dot_general(jnp.minimum(q, 0.0), mn, dims, preferred_element_type=jnp.float32, precision=hi))
    rows = jax.lax.broadcasted_iota(jnp.int32, (gp, n), 0) < group  # [Gp, N]
    if page_reduce == "max":
        r = jnp.max(jnp.where(rows, u, -jnp.inf), axis=0, keepdims=True)
    else:
        r = jnp.sum(jnp.where(rows, u, 0.0), axis=0, keepdims=True)
        if page_reduce == "mean":
            r = r / group
    page = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)
    r = jnp.where(ne, r, -jnp.inf)
    return jnp.where((page == newest) & ne, jnp.inf, r), page


def _top_k(r, page, k: int, kp: int, n: int):
    """Top k of r [1, N'] (ties: lowest index first; columns >= n never chosen) -> (idx i32[1, kp],
    ok i32[1, kp]), entries past k are 0."""
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, kp), 1)
    valid = page < n

    def body(i, carry):
        taken, idx, ok = carry
        free = valid & jnp.logical_not(taken)
        best = jnp.max(jnp.where(free, r, -jnp.inf), axis=1, keepdims=True)  # [1, 1]: one-axis reductions
        pick = jnp.min(jnp.where((r == best) & free, page, n), axis=1, keepdims=True)
        taken = taken | (page == pick)
        idx = jnp.where(slot == i, pick, idx)
        ok = jnp.where(slot == i, (best > -jnp.inf).astype(jnp.int32), ok)
        return taken, idx, ok

    init = (jnp.zeros(r.shape, bool), jnp.zeros((1, kp), jnp.int32), jnp.zeros((1, kp), jnp.int32))
    _, idx, ok = jax.lax.fori_loop(0, k, body, init)
    return idx, ok


def _select_kernel(newest_ref, q_ref, mn_ref, mx_ref, ne_ref, idx_ref, ok_ref, *, group, page_reduce, k, n, backend):
    if backend == "triton":  # pad the page axis to a power of two with masked loads
        from jax.experimental.pallas import triton as plgpu  # lazy: platform-specific Pallas backend

        npad = mn_ref.shape[0]  # blocks of next_pow2(n) pages: the tail is masked
        in_n = jnp.arange(npad) < n
        mn = plgpu.load(mn_ref, mask=in_n[:, None], other=0.0)
        mx = plgpu.load(mx_ref, mask=in_n[:, None], other=0.0)
        ne = plgpu.load(ne_ref, mask=in_n[None, :], other=0) > 0
        newest = newest_ref[()]
    else:
        mn, mx, ne = mn_ref[...], mx_ref[...], ne_ref[...] > 0
        newest = newest_ref[0, 0]
    r, page = _scores(q_ref[...], mn, mx, ne, newest, group=group, page_reduce=page_reduce)
    idx, ok = _top_k(r, page, k, idx_ref.shape[-1], n)
    idx_ref[...] = idx
    ok_ref[...] = ok


def select_pages(q: Float[Array, "b h d"], page_min: Float[Array, "b hk n d"], page_max: Float[Array, "b hk n d"],
                 nonempty: Bool[Array, "b hk n"], newest: Int[Array, "b hk"], k: int, *, page_reduce: str = "max",
                 backend: str | None = None,
                 interpret: bool | None = None) -> tuple[Int[Array, "b hk s"], Bool[Array, "b hk s"]]:
    """Kernel version of `select_reference` (same arguments and results)."""
    if page_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"page_reduce={page_reduce!r}; allowed: {GROUP_REDUCTIONS}")
    backend, interpret = common.resolve_backend(backend, interpret)
    b, h, d = q.shape
    hk, n = nonempty.shape[1:]
    g = h // hk
    if not 1 <= k <= n:
        raise ValueError(f"k={k} pages must be in [1, {n}]")
    if backend == "triton" and not (common.is_pow2(d) and d >= 16):
        raise common.KernelUnsupported(f"quest select: head_dim {d} is not a power of two >= 16")
    if backend == "triton":
        gp = max(common.GPU_MIN_ROWS, common.next_pow2(g))
    else:
        gp = common.cdiv(g, common.TPU_MIN_ROWS) * common.TPU_MIN_ROWS
    kp = common.next_pow2(k) if backend == "triton" else common.cdiv(k, 128) * 128
    npad = common.next_pow2(n) if backend == "triton" else n
    bh = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, j: (i, j) + (0,) * len(shape))
    newest_spec = bh() if backend == "triton" else bh(1, 1)
    newest = jnp.asarray(newest, jnp.int32)
    newest = newest if backend == "triton" else newest[..., None, None]
    kernel = functools.partial(_select_kernel, group=g, page_reduce=page_reduce, k=k, n=n, backend=backend)
    idx, ok = pl.pallas_call(
        kernel,
        grid=(b, hk),
        in_specs=[newest_spec, bh(gp, d), bh(npad, d), bh(npad, d), bh(1, npad)],
        out_specs=[bh(1, kp), bh(1, kp)],
        out_shape=[jax.ShapeDtypeStruct((b, hk, 1, kp), jnp.int32)] * 2,
        compiler_params=common.compiler_params(backend, interpret, num_warps=4, num_stages=1,
                                               dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_arg(backend, interpret),
        name="pikv_quest_select",
    )(newest, common.group_query(q, hk, gp), page_min.astype(jnp.float32), page_max.astype(jnp.float32),
      nonempty.astype(jnp.int32)[:, :, None, :])
    return idx[:, :, 0, :k], ok[:, :, 0, :k] > 0


# ---------------------------------------------------------------------------------------------
# TPU attention over selected pages


def _tpu_paged_kernel(pages_ref, qpos_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_ref, l_ref, lg_ref,
                      acc_sc, m_sc, l_sc, *, group: int, window: int | None, scale: float):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    common.tpu_online_begin(i == 0, acc_sc, m_sc, l_sc)
    p = pos_ref[pl.ds(i, 1), :]  # [1, ps]; -1 for skipped pages
    vis = visible(qpos_ref[b, h], p, window)
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(vis, s * scale, -jnp.inf)  # [Gp, ps]
    lg_ref[pl.ds(i, 1)] = s[None, :group]
    pr, alpha, m_new, l_new = common.online_update(s, m_sc[:, :1], l_sc[:, :1])
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * alpha + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)
    common.tpu_online_end(i == pl.num_programs(2) - 1, acc_sc, m_sc, l_sc, o_ref, m_ref, l_ref)


def tpu_paged_partials(q, k, v, pos, qpos, pages, page_size: int, *, window, interpret) -> common.Partials:
    """Attention over pages[b, h, :] (-1 = skip) of a uniform cache; one page per grid step."""
    from jax.experimental.pallas import tpu as pltpu  # lazy: platform-specific Pallas backend

    b, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    n = pages.shape[-1]
    gp = common.cdiv(g, common.TPU_MIN_ROWS) * common.TPU_MIN_ROWS
    ps = page_size
    slots = jnp.maximum(pages, 0)[..., None] * ps + jnp.arange(ps)
    pos_sel = jnp.where((pages >= 0)[..., None], jnp.take_along_axis(pos, slots.reshape(b, hk, n * ps), axis=-1)
                        .reshape(b, hk, n, ps), -1)
    page_map = lambda i, j, t, pages_ref, qpos_ref: (i, j, jnp.maximum(pages_ref[i, j, t], 0), 0)
    whole = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, j, t, *_: (i, j) + (0,) * len(shape))
    f32 = jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hk, n),
        in_specs=[whole(gp, d), pl.BlockSpec((None, None, ps, d), page_map),
                  pl.BlockSpec((None, None, ps, d), page_map), whole(n, ps)],
        out_specs=[whole(gp, d), whole(gp, 128), whole(gp, 128), whole(n, g, ps)],
        scratch_shapes=[pltpu.VMEM((gp, d), f32), pltpu.VMEM((gp, 128), f32), pltpu.VMEM((gp, 128), f32)],
    )
    kernel = functools.partial(_tpu_paged_kernel, group=g, window=window, scale=d ** -0.5)
    o, m, l, lg = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hk, gp, d), f32), jax.ShapeDtypeStruct((b, hk, gp, 128), f32),
                   jax.ShapeDtypeStruct((b, hk, gp, 128), f32), jax.ShapeDtypeStruct((b, hk, n, g, ps), f32)],
        compiler_params=common.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=common.interpret_arg("mosaic_tpu", interpret),
        name="pikv_quest_paged_attention_tpu",
    )(pages.astype(jnp.int32), qpos, common.group_query(q, hk, gp), k, v, pos_sel)
    logits = jnp.swapaxes(lg, 2, 3).reshape(b, hk, g, n * ps)
    return common.tpu_partials(o, m, l, logits, jnp.full((b, hk), n * ps, jnp.int32))
