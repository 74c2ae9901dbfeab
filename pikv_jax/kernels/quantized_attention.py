# ruff: noqa: F722
# (jaxtyping shape strings such as "b h d" are not forward references)
"""Decode attention over a KIVI cache with dequantization fused into the block loads.

Reference: `reference` below (dequantize everything to f32 with kernels/quant.py, attend the
quantized region and the ring as two segments, kernels/split_k.py, merged by `common.finish`).
Both take the cache's arrays, not the cache object (pikv_jax/cache/quantized.py holds that layout;
the dispatcher unpacks it).

Layout: kq, vq: u8[B, Hkv, Cq, D * bits / 8] packed codes (channel c = per * j + r sits in bits
[r * bits, (r + 1) * bits) of byte j, per = 8 / bits); keys: k_scale, k_min [B, Hkv, Cq / Gk, D]
(per channel, per group of Gk tokens); values: v_scale, v_min [B, Hkv, Cq, D / Gv] (per token, per
group of Gv channels); a full-precision ring k_res, v_res [B, Hkv, R, D]; pos [B, Hkv, Cq + R]
(quantized slots first). Gk = Gv = group_size.

Two kernel passes share one epilogue (common.finish): the quantized region through the
kernel here, the ring through the ordinary decode kernel, merged by log-sum-exp, so the mass covers
all Cq + R slots in pos order. Dequantized keys and values are formed in the query's dtype (bf16
on the GPU: the dot runs on tensor cores) from f32 codes * scale + min.

The ring may be stored in another dtype than the query's (bfloat16 under a float32 model): the
kernel path casts its R slots to the query's dtype, the reference computes in float32.

Bytes per slot, int4, D = 128, G = 32, f16 scales: codes 2 * 64, value scales 2 * 4 * 2, key
scales 2 * 128 * 2 / 32: 160 bytes against 512 for bf16 (3.2x fewer); int8: 288; positions, when
stored, add 4 (pikv_jax/cache/quantized.py has the whole count).

Backends:
- "triton": unpacks in registers (shift / mask, then join + reshape to interleave the nibbles),
  broadcasts key scales over their token group and value scales over their channel group by 3-D
  reshapes. Needs power-of-two D, Gk, Gv; blocks of max(Gk, 64) tokens.
- "mosaic_tpu": avoids lane shuffles: the query is split by nibble position in the wrapper
  (q_r[j] = q[per * j + r]) so each unpacked nibble plane is dotted with its own query plane; key
  scales are de-interleaved by a 0/1 selection matmul (HIGHEST precision, exact), value scales are
  broadcast over their channel group with selects, and the output comes back plane by plane
  (re-interleaved in the wrapper). Blocks of 512 tokens (or the whole region when smaller).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Float32, Int, UInt8

from pikv_jax.attention.reference import GROUP_REDUCTIONS, visible
from pikv_jax.kernels import common, quant, split_k
from pikv_jax.kernels import decode_attention as da


def check_layout(q, kq, v_scale, *, bits: int, group_size: int) -> None:
    """ValueError unless `bits` and `group_size` match the arrays' shapes (they are not stored in them)."""
    quant.check_bits(bits)
    d = q.shape[-1]
    if kq.shape[-1] * 8 != d * bits:
        raise ValueError(f"bits={bits} does not match kq's last axis {kq.shape[-1]} for head_dim {d} "
                         f"(expected head_dim * bits / 8 = {d * bits / 8:g})")
    if group_size < 1 or v_scale.shape[-1] * group_size != d:
        raise ValueError(f"group_size={group_size} does not match v_scale's last axis {v_scale.shape[-1]} for "
                         f"head_dim {d} (expected head_dim / group_size)")


def reference(q: Float[Array, "b h d"], kq: UInt8[Array, "b hk cq dp"], k_scale: Float[Array, "b hk ng d"],
              k_min: Float[Array, "b hk ng d"], vq: UInt8[Array, "b hk cq dp"], v_scale: Float[Array, "b hk cq nc"],
              v_min: Float[Array, "b hk cq nc"], k_res: Float[Array, "b hk r d"], v_res: Float[Array, "b hk r d"],
              pos: Int[Array, "b hk cq+r"], q_pos: Int[Array, " b"] | Int[Array, "b hk"], *, bits: int,
              group_size: int, sliding_window: int | None = None,
              group_reduce: str = "mean") -> tuple[Float[Array, "b h d"], Float32[Array, "b hk cq+r"]]:
    """Dequantize-then-attend in f32: (out in q's dtype, mass over all Cq + R slots in pos order).
    The quantized region and the ring are attended apart and merged by log-sum-exp (never
    concatenated: under a `seq` mesh axis only the quantized region is split; kernels/split_k.py)."""
    check_layout(q, kq, v_scale, bits=bits, group_size=group_size)
    f32 = jnp.float32
    cq = kq.shape[2]
    parts = []
    if cq:
        parts.append(split_k.segment_partials(q, quant.dequantize_keys(kq, k_scale, k_min, bits, group_size, f32),
                                              quant.dequantize_values(vq, v_scale, v_min, bits, group_size, f32),
                                              pos[:, :, :cq], q_pos, sliding_window=sliding_window))
    parts.append(split_k.segment_partials(q, k_res, v_res, pos[:, :, cq:], q_pos, sliding_window=sliding_window))
    return common.finish(parts, group=q.shape[1] // k_res.shape[1], group_reduce=group_reduce, out_dtype=q.dtype)


def unpack_interleaved(codes, bits: int):
    """u8 [N, M] packed -> f32 [N, M * 8 / bits] codes in channel order (Triton-friendly: only
    shifts, masks and 2-way joins along the last axis)."""
    n, m = codes.shape
    if bits == 8:
        return codes.astype(jnp.float32)
    if bits == 4:
        return jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(n, 2 * m).astype(jnp.float32)
    a = [(codes >> (2 * r)) & 3 for r in range(4)]
    pairs = jnp.stack([jnp.stack([a[0], a[2]], axis=-1), jnp.stack([a[1], a[3]], axis=-1)], axis=-1)
    return pairs.reshape(n, 4 * m).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(qpos_ref, lim_ref, q_ref, kq_ref, ks_ref, km_ref, vq_ref, vs_ref, vm_ref, pos_ref,
                o_ref, m_ref, l_ref, lg_ref, *, bits: int, gk: int, gv: int, block_k: int, split_len: int, group: int,
                window: int | None, scale: float):
    from jax.experimental.pallas import triton as plgpu  # lazy: platform-specific Pallas backend

    qp = qpos_ref[()]
    lim = lim_ref[()]
    gp, d = q_ref.shape  # blocks of Gp rows over the G real ones: padding rows load as 0
    q = plgpu.load(q_ref, mask=(jnp.arange(gp) < group)[:, None], other=0)
    cdt = q.dtype
    ng = block_k // gk
    start0 = pl.program_id(2) * split_len
    n_blocks = jnp.maximum(common.cdiv(jnp.minimum(lim - start0, split_len), block_k), 0)
    row_ok = (jnp.arange(gp) < group)[:, None]
    f32 = jnp.float32

    def body(i, carry):
        acc, m, l = carry
        start = start0 + i * block_k
        ok = start + jnp.arange(block_k) < lim
        p = plgpu.load(pos_ref.at[pl.ds(start, block_k)], mask=ok, other=-1)
        g0 = start // gk
        gok = ((g0 + jnp.arange(ng)) * gk < lim)[:, None]
        kc = unpack_interleaved(plgpu.load(kq_ref.at[pl.ds(start, block_k), :], mask=ok[:, None], other=0), bits)
        ks = plgpu.load(ks_ref.at[pl.ds(g0, ng), :], mask=gok, other=0).astype(f32)  # [ng, D]
        km = plgpu.load(km_ref.at[pl.ds(g0, ng), :], mask=gok, other=0).astype(f32)
        k = (kc.reshape(ng, gk, d) * ks[:, None, :] + km[:, None, :]).reshape(block_k, d).astype(cdt)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32) * scale
        s = jnp.where(visible(qp, p, window)[None, :], s, -jnp.inf)
        plgpu.store(lg_ref.at[:, pl.ds(start, block_k)], s, mask=row_ok & ok[None, :])
        pr, alpha, m, l = common.online_update(s, m, l)
        vc = unpack_interleaved(plgpu.load(vq_ref.at[pl.ds(start, block_k), :], mask=ok[:, None], other=0), bits)
        vs = plgpu.load(vs_ref.at[pl.ds(start, block_k), :], mask=ok[:, None], other=0).astype(f32)  # [bk, D/Gv]
        vm = plgpu.load(vm_ref.at[pl.ds(start, block_k), :], mask=ok[:, None], other=0).astype(f32)
        v = (vc.reshape(block_k, d // gv, gv) * vs[:, :, None] + vm[:, :, None]).reshape(block_k, d).astype(cdt)
        acc = acc * alpha + jnp.dot(pr.astype(cdt), v, preferred_element_type=f32)
        return acc, m, l

    common.gpu_online_loop(n_blocks, body, o_ref, m_ref, l_ref)


def _gpu_partials(q, codes, pos, qpos, limit, *, bits, group_size, window, interpret, block_k, num_splits,
                  num_warps, num_stages) -> common.Partials:
    """codes = (kq, k_scale, k_min, vq, v_scale, v_min) of the quantized region."""
    b, h, d = q.shape
    hk, cq, dp = codes[0].shape[1:]
    g = h // hk
    gp = max(common.GPU_MIN_ROWS, common.next_pow2(g))
    gk = gv = group_size
    bk = block_k or max(gk, 64)
    splits, split_len = da.gpu_split_grid(b, hk, cq, bk, num_splits)
    kernel = functools.partial(_gpu_kernel, bits=bits, gk=gk, gv=gv, block_k=bk, split_len=split_len, group=g,
                               window=window, scale=d ** -0.5)
    spec = da.gpu_spec
    out_specs, out_shape = da.gpu_partial_outputs(b, hk, splits, g, gp, d, cq)
    o, m, l, logits = pl.pallas_call(
        kernel,
        grid=(b, hk, splits),
        in_specs=[spec(), spec(), spec(gp, d), spec(cq, dp), spec(cq // gk, d), spec(cq // gk, d), spec(cq, dp),
                  spec(cq, d // gv), spec(cq, d // gv), spec(pos.shape[-1])],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.gpu_compiler_params(num_warps or 8, num_stages or 2),  # 8 warps: dequantized tiles
        interpret=common.interpret_arg("triton", interpret),                         # are f32 in registers
        name="pikv_quantized_decode_attention",
    )(qpos, limit, q.reshape(b, hk, g, d), *codes, pos)
    return common.Partials(o, m, l, logits, limit)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)

TPU_BLOCK = 512


def _tpu_kernel(nblk_ref, qpos_ref, qr_ref, kq_ref, ks_ref, km_ref, vq_ref, vs_ref, vm_ref, pos_ref,
                o_ref, m_ref, l_ref, lg_ref, acc_sc, m_sc, l_sc, s_sc, *, bits: int, gk: int, gv: int, block_k: int,
                capacity: int, group: int, window: int | None, scale: float):
    b, j = pl.program_id(0), pl.program_id(1)
    hk, per, gp, dq = qr_ref.shape  # dq = D / per channels per nibble plane
    d = dq * per
    ng = block_k // gk
    mask = (1 << bits) - 1
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    cdt = qr_ref.dtype
    common.tpu_online_begin(j == 0, acc_sc, m_sc, l_sc)
    active = j < nblk_ref[b]

    @pl.when(active)
    def _step():
        in_range, row_in = common.tpu_block_in_range(j, block_k, capacity)
        # 0/1 matrices: sel[r][c, i] = (c == per * i + r) picks nibble plane r of a channel vector
        ch = jax.lax.broadcasted_iota(jnp.int32, (d, dq), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (d, dq), 1)
        sel = [(ch == per * col + r).astype(f32) for r in range(per)]
        vgroup = jax.lax.broadcasted_iota(jnp.int32, (1, dq), 1) // (gv // per)  # value group of plane column
        for h in range(hk):
            kcodes = kq_ref[h].astype(jnp.int32)  # [bk, D / per]
            vcodes = vq_ref[h].astype(jnp.int32)
            ks, km = ks_ref[h].astype(f32), km_ref[h].astype(f32)  # [ng, D]
            if per > 1:
                ks_r = [jnp.dot(ks, sel[r], precision=hi) for r in range(per)]
                km_r = [jnp.dot(km, sel[r], precision=hi) for r in range(per)]
            else:
                ks_r, km_r = [ks], [km]
            for i in range(ng):  # key scales are shared by the gk tokens of a group
                rows = slice(i * gk, (i + 1) * gk)
                lg = None
                for r in range(per):
                    code = ((kcodes[rows] >> (bits * r)) & mask).astype(f32)
                    kdeq = (code * ks_r[r][i:i + 1] + km_r[r][i:i + 1]).astype(cdt)  # [gk, D / per]
                    part = jax.lax.dot_general(qr_ref[h, r], kdeq, (((1,), (1,)), ((), ())),
                                               preferred_element_type=f32, precision=hi)
                    lg = part if lg is None else lg + part
                s_sc[:, rows] = lg
            vis = visible(qpos_ref[b, h], pos_ref[pl.ds(h, 1), :], window) & in_range
            s = jnp.where(vis, s_sc[...] * scale, -jnp.inf)  # [Gp, bk]
            lg_ref[h] = s[:group]
            p, alpha, m_new, l_new = common.online_update(s, m_sc[h][:, :1], l_sc[h][:, :1])
            vs, vm = vs_ref[h].astype(f32), vm_ref[h].astype(f32)  # [bk, D / Gv]
            vs_b = jnp.zeros((block_k, dq), f32)
            vm_b = jnp.zeros((block_k, dq), f32)
            for a in range(vs.shape[1]):  # broadcast each value group's scale over its plane columns
                vs_b = jnp.where(vgroup == a, vs[:, a:a + 1], vs_b)
                vm_b = jnp.where(vgroup == a, vm[:, a:a + 1], vm_b)
            pc = p.astype(cdt)
            for r in range(per):
                vdeq = ((vcodes >> (bits * r)) & mask).astype(f32) * vs_b + vm_b
                if capacity % block_k:
                    vdeq = jnp.where(row_in, vdeq, 0.0)
                pv = jnp.dot(pc, vdeq.astype(cdt), preferred_element_type=f32, precision=hi)
                acc_sc[h, r] = acc_sc[h, r] * alpha + pv
            m_sc[h] = jnp.broadcast_to(m_new, m_sc.shape[1:])
            l_sc[h] = jnp.broadcast_to(l_new, l_sc.shape[1:])

    common.tpu_skip_logits(active, lg_ref)
    common.tpu_online_end(j == pl.num_programs(1) - 1, acc_sc, m_sc, l_sc, o_ref, m_ref, l_ref)


def _tpu_partials(q, codes, pos, qpos, limit, *, bits, group_size, window, interpret, block_k) -> common.Partials:
    """codes = (kq, k_scale, k_min, vq, v_scale, v_min) of the quantized region."""
    from jax.experimental.pallas import tpu as pltpu  # lazy: platform-specific Pallas backend

    b, h, d = q.shape
    hk, cq, dp = codes[0].shape[1:]
    g = h // hk
    gp = common.cdiv(g, common.TPU_MIN_ROWS) * common.TPU_MIN_ROWS
    per = 8 // bits
    dq = d // per
    gk = gv = group_size
    bk = block_k or (cq if cq <= TPU_BLOCK else TPU_BLOCK)
    nb = common.cdiv(cq, bk)
    pos = pos if bk % 128 == 0 else pos[:, :, :cq]  # a block equal to the whole axis is allowed
    nblk = common.cdiv(jnp.max(limit, axis=1), bk)
    qg = common.group_query(q, hk, gp)  # [B, Hkv, Gp, D]
    qr = jnp.moveaxis(qg.reshape(b, hk, gp, dq, per), -1, 2)  # [B, Hkv, per, Gp, D / per]

    def blk(*shape):
        def index(i, j, nblk_ref, qpos_ref):
            return (i, 0, common.used_block(j, nblk_ref[i])) + (0,) * (len(shape) - 2)
        return pl.BlockSpec((None,) + shape, index)

    row = lambda *shape: pl.BlockSpec((None,) + shape, lambda i, j, *_: (i,) + (0,) * len(shape))
    f32 = jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, nb),
        in_specs=[row(hk, per, gp, dq), blk(hk, bk, dp), blk(hk, bk // gk, d), blk(hk, bk // gk, d),
                  blk(hk, bk, dp), blk(hk, bk, d // gv), blk(hk, bk, d // gv), blk(hk, bk)],
        out_specs=[row(hk, per, gp, dq), row(hk, gp, 128), row(hk, gp, 128),
                   pl.BlockSpec((None, hk, g, bk), lambda i, j, *_: (i, 0, 0, j))],
        scratch_shapes=[pltpu.VMEM((hk, per, gp, dq), f32), pltpu.VMEM((hk, gp, 128), f32),
                        pltpu.VMEM((hk, gp, 128), f32), pltpu.VMEM((gp, bk), f32)],
    )
    kernel = functools.partial(_tpu_kernel, bits=bits, gk=gk, gv=gv, block_k=bk, capacity=cq, group=g, window=window,
                               scale=d ** -0.5)
    o, m, l, logits = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hk, per, gp, dq), f32), jax.ShapeDtypeStruct((b, hk, gp, 128), f32),
                   jax.ShapeDtypeStruct((b, hk, gp, 128), f32), jax.ShapeDtypeStruct((b, hk, g, cq), f32)],
        compiler_params=common.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=common.interpret_arg("mosaic_tpu", interpret),
        name="pikv_quantized_decode_attention_tpu",
    )(nblk.astype(jnp.int32), qpos, qr, *codes, pos)
    o = jnp.moveaxis(o, 2, -1).reshape(b, hk, gp, d)  # planes back to channel order
    return common.tpu_partials(o, m, l, logits, limit)


# ---------------------------------------------------------------------------------------------
# Entry points


def unsupported_reason(q, kq, k_res, v_res, pos, *, bits: int, group_size: int, backend: str) -> str | None:
    """None when the kernel handles these inputs, else the rule they break."""
    b, h, d = q.shape
    hk, cq = kq.shape[1], kq.shape[2]
    if jnp.dtype(q.dtype) not in common.FLOAT_DTYPES:
        return f"q dtype {q.dtype} (allowed: float32, bfloat16, float16)"
    if h % hk:
        return f"{h} query heads are not a multiple of {hk} KV heads"
    per = 8 // bits
    if group_size % per:
        return f"group_size {group_size} is not a multiple of the {per} codes packed per byte"
    if backend == "triton":
        if not (common.is_pow2(d) and d >= 16 and common.is_pow2(group_size)):
            return f"head_dim {d} and group_size {group_size} must be powers of two (head_dim >= 16) for Triton tiles"
    else:
        if jnp.dtype(q.dtype) == jnp.float16:
            return "float16 queries are not supported on TPU"
        if cq > TPU_BLOCK and (TPU_BLOCK % group_size or (TPU_BLOCK // group_size) % 16):
            return f"group_size {group_size}: TPU blocks of {TPU_BLOCK} tokens need a power-of-two group_size <= 32"
    ring = jax.ShapeDtypeStruct(k_res.shape, q.dtype)  # the ring is cast to the query's dtype
    return da.unsupported_reason(q, ring, jax.ShapeDtypeStruct(v_res.shape, q.dtype), pos[:, :, cq:], backend)


def quantized_decode_attention(
        q: Float[Array, "b h d"], kq: UInt8[Array, "b hk cq dp"], k_scale: Float[Array, "b hk ng d"],
        k_min: Float[Array, "b hk ng d"], vq: UInt8[Array, "b hk cq dp"], v_scale: Float[Array, "b hk cq nc"],
        v_min: Float[Array, "b hk cq nc"], k_res: Float[Array, "b hk r d"], v_res: Float[Array, "b hk r d"],
        pos: Int[Array, "b hk cq+r"], q_pos: Int[Array, " b"] | Int[Array, "b hk"], *, bits: int, group_size: int,
        sliding_window: int | None = None, group_reduce: str = "mean", backend: str | None = None,
        interpret: bool | None = None, block_k: int | None = None, num_splits: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None) -> tuple[Float[Array, "b h d"], Float32[Array, "b hk cq+r"]]:
    """Kernel version of `reference` (same arguments and results): the quantized region through the
    kernel above, the ring through the decode kernel, both merged by log-sum-exp."""
    if group_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"group_reduce={group_reduce!r}; allowed: {GROUP_REDUCTIONS}")
    check_layout(q, kq, v_scale, bits=bits, group_size=group_size)
    backend, interpret = common.resolve_backend(backend, interpret)
    reason = unsupported_reason(q, kq, k_res, v_res, pos, bits=bits, group_size=group_size, backend=backend)
    if reason:
        raise common.KernelUnsupported(f"quantized decode attention: {reason}")
    b, h, _ = q.shape
    hk, cq = kq.shape[1], kq.shape[2]
    qpos = common.q_positions(q_pos, b, hk)
    codes = (kq, k_scale, k_min, vq, v_scale, v_min)
    parts = []
    if cq > 0:
        limit = common.slot_limit(pos[:, :, :cq])
        layout = dict(bits=bits, group_size=group_size, window=sliding_window, interpret=interpret, block_k=block_k)
        if backend == "triton":
            parts.append(_gpu_partials(q, codes, pos, qpos, limit, num_splits=num_splits, num_warps=num_warps,
                                       num_stages=num_stages, **layout))
        else:
            parts.append(_tpu_partials(q, codes, pos, qpos, limit, **layout))
    ring = k_res.shape[2]
    parts.append(da.decode_partials(q, k_res.astype(q.dtype), v_res.astype(q.dtype), pos[:, :, cq:], qpos,
                                    sliding_window=sliding_window, backend=backend, interpret=interpret,
                                    limit=jnp.full((b, hk), ring, jnp.int32), num_splits=1))
    return common.finish(parts, group=h // hk, group_reduce=group_reduce, out_dtype=q.dtype)
