"""Pallas kernels against their XLA paths on one device, in one run: each kernel is first checked
against its pure-jnp reference on fresh random data, then the XLA path and the Pallas path of the same
function are timed side by side; GB/s are reported against the copy bandwidth measured in this run.

    python scripts/bench_kernels.py                  # GPU: writes benchmarks/kernels-<card>.json
    python scripts/bench_kernels.py --quick --out /tmp/k.json   # small shapes (CPU smoke run, interpreted)

Sections (each guarded: a kernel that fails to compile or to match is recorded with its error and
the run goes on):
- decode_bf16: decode attention with per-slot mass, B=8 (and 1), H=32, Hkv=8, D=128, 32k slots;
  a small sweep of kernel tiling (block_k, warps, stages, splits); a ragged batch; jax's own Pallas
  `decode_attention.gqa` (no mass, and it wants [B, S, Hkv, D]) for scale.
- decode_int8 / decode_int4: the KIVI cache (ring of 128), fused dequantization vs dequantize-then-
  attend, and against the bf16 kernel (goal: int4 faster than bf16).
- quest: top-k page selection (2048 pages, 64 selected) and attention over the selected pages.
- quant_pack: quantize-and-pack of 32 tokens (a ring flush) and of a 32k-token prompt, with the
  fraction of bit-identical codes.
- snapkv_scoring: the XLA window scoring at a 32k prompt against one layer's prefill attention,
  the measurement behind "a kernel does not pay" (kernels/__init__.py).
Timings: median over repeats of the mean of back-to-back calls (async dispatch keeps the device
busy), after compilation and warm-up. Bytes: what the function must read (and write), see each row.
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback

import jax
import jax.numpy as jnp
from optional_deps import stub_missing_optional_deps

STUBBED = stub_missing_optional_deps()

from pikv_jax.attention import dispatch  # noqa: E402 - after the stubs
from pikv_jax.attention import reference as ref_attn  # noqa: E402
from pikv_jax.bench import device_and_ceiling, machine_info, timed, write_json  # noqa: E402
from pikv_jax.cache.policies.base import PrefillContext  # noqa: E402
from pikv_jax.cache.policies.quest import page_bounds  # noqa: E402
from pikv_jax.cache.policies.scoring import window_probs  # noqa: E402
from pikv_jax.cache.quantized import init_quantized_layer  # noqa: E402
from pikv_jax.cache.state import LayerCache  # noqa: E402
from pikv_jax.kernels import common, quant  # noqa: E402
from pikv_jax.kernels import decode_attention as da  # noqa: E402
from pikv_jax.kernels import quant_pack as qp  # noqa: E402
from pikv_jax.kernels import quantized_attention as qa  # noqa: E402
from pikv_jax.kernels import quest as kq  # noqa: E402

GOAL_COPY_FRACTION = 0.8
GOAL_X_XLA = 1.3


def on_gpu() -> bool:
    return common.platform() == "gpu"


def do_sweep(args) -> bool:
    """Tiling sweeps run on a GPU (full shapes) or when asked (--sweep), while time allows."""
    return (args.sweep or (on_gpu() and not args.quick)) and time.perf_counter() < args.sweep_deadline


def rate(nbytes: float, seconds: float, copy: float) -> dict:
    gbps = nbytes / seconds / 1e9
    return {"ms": 1e3 * seconds, "GBps": gbps, "fraction_of_copy": gbps / copy}


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def compare(out, out_ref, mass, mass_ref, out_tol: float, mass_rel_tol: float) -> dict:
    """Errors of (out, mass) against the reference; mass relative to its largest entry."""
    top = max(1e-30, float(jnp.max(mass_ref)))
    r = {"out_max_abs_err": max_err(out, out_ref), "out_tol": out_tol, "mass_max_abs_err": max_err(mass, mass_ref),
         "mass_max_rel_err": max_err(mass, mass_ref) / top, "mass_rel_tol": mass_rel_tol}
    r["ok"] = r["out_max_abs_err"] <= out_tol and r["mass_max_rel_err"] <= mass_rel_tol
    return r


def guarded(results: dict, name: str):
    """Decorator: runs a section, storing its dict or the error (the run continues)."""
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - record any lowering / runtime failure and go on
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:300]}")
        results[name]["section_s"] = time.perf_counter() - t0
        return fn
    return wrap


# ---------------------------------------------------------------------------------------------
# data


def full_cache(key, b, hk, c, d, dtype):
    k1, k2 = jax.random.split(key)
    k = jax.random.normal(k1, (b, hk, c, d), dtype)
    v = jax.random.normal(k2, (b, hk, c, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, hk, c))
    return k, v, pos


@functools.partial(jax.jit, static_argnames=("bits", "group", "ring", "dtype"))
def _quantized_from(k, v, *, bits, group, ring, dtype):
    """KIVI cache holding k, v ([B, Hkv, C, D]): oldest C - ring tokens quantized, newest in the ring."""
    b, hk, c, d = k.shape
    cache = init_quantized_layer(b, hk, c, d, dtype, bits=bits, group_size=group, residual_length=ring,
                                 scale_dtype=jnp.float16)
    cq = cache.quantized_slots
    if cq + ring != c:
        raise ValueError(f"capacity {c} - ring {ring} must be a multiple of group {group}")
    kq, ks, km = quant.quantize_keys(k[:, :, :cq], bits, group, jnp.float16)
    vq, vs, vm = quant.quantize_values(v[:, :, :cq], bits, group, jnp.float16)
    return cache.replace(kq=kq, k_scale=ks, k_min=km, vq=vq, v_scale=vs, v_min=vm,
                         k_res=k[:, :, cq:].astype(dtype), v_res=v[:, :, cq:].astype(dtype),
                         pos=jnp.broadcast_to(jnp.arange(cq + ring, dtype=jnp.int32), (b, hk, cq + ring)),
                         ring_count=jnp.full((b, hk), ring, jnp.int32))


def quantized_arrays(cache):
    """(arrays, layout): the cache as the kernel and its reference take it."""
    arrays = (cache.kq, cache.k_scale, cache.k_min, cache.vq, cache.v_scale, cache.v_min, cache.k_res, cache.v_res,
              cache.pos)
    return arrays, dict(bits=cache.bits, group_size=cache.group_size)


# ---------------------------------------------------------------------------------------------
# sections


def bench_decode(args, copy, results):
    b_list = (2, 1) if args.quick else (8, 1)
    h, hk, d = (8, 2, 64) if args.quick else (32, 8, 128)
    c = 1000 if args.quick else 32768
    dtype = jnp.bfloat16
    out = {"shape": dict(H=h, Hkv=hk, D=d, C=c, dtype="bfloat16"), "rows": []}
    for bi, b in enumerate(b_list):
        k, v, pos = full_cache(jax.random.key(10 + b), b, hk, c, d, dtype)
        q = jax.random.normal(jax.random.key(20 + b), (b, h, d), dtype)
        q_pos = jnp.full((b,), c - 1, jnp.int32)
        kv_bytes = int(k.nbytes + v.nbytes)
        xla = jax.jit(ref_attn.decode_attention)
        pallas = jax.jit(da.decode_attention)
        o_ref, m_ref = xla(q, k, v, pos, q_pos)
        o_k, m_k = pallas(q, k, v, pos, q_pos)
        check = compare(o_k, o_ref, m_k, m_ref, 2.5e-2, 1e-3)
        t_xla = timed(xla, q, k, v, pos, q_pos)
        t_pal = timed(pallas, q, k, v, pos, q_pos)
        parts = jax.jit(da.decode_partials)
        t_kernel_only = timed(parts, q, k, v, pos, q_pos)
        row = dict(B=b, kv_bytes=kv_bytes, check=check, xla=rate(kv_bytes, t_xla, copy),
                   pallas=rate(kv_bytes, t_pal, copy), pallas_kernel_only=rate(kv_bytes, t_kernel_only, copy),
                   x_xla=t_xla / t_pal,
                   extra_bytes_per_slot=dict(pos=4, logits_write=4 * (h // hk), logits_read=4 * (h // hk), mass=4))
        # tiling sweep (the defaults are a guess made without a GPU)
        if do_sweep(args):
            sweep = []
            bk0 = da.gpu_block_k(d, 2)
            s0 = da.gpu_num_splits(b, hk, c, bk0)
            configs = [dict(block_k=bk, num_warps=w, num_stages=st, num_splits=sp)
                       for bk, w, st, sp in [(bk0, 4, 2, s0), (bk0, 4, 3, s0), (bk0, 8, 3, s0), (bk0 // 2, 4, 3, s0),
                                             (bk0 * 2, 4, 2, s0), (bk0 * 2, 8, 2, s0), (bk0, 4, 3, 2 * s0),
                                             (bk0, 4, 3, max(1, s0 // 2)), (bk0 * 2, 4, 3, 2 * s0)]]
            for cfg in configs:
                try:
                    fn = jax.jit(functools.partial(da.decode_attention, **cfg))
                    o2, m2 = fn(q, k, v, pos, q_pos)
                    ok = compare(o2, o_ref, m2, m_ref, 2.5e-2, 1e-3)["ok"]
                    sweep.append(dict(cfg, ok=ok, **rate(kv_bytes, timed(fn, q, k, v, pos, q_pos), copy)))
                except Exception as e:  # noqa: BLE001
                    sweep.append(dict(cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
            good = [s for s in sweep if s.get("ok")]
            row["sweep"] = sweep
            if good:
                best = max(good, key=lambda s: s["GBps"])
                row["best"] = best
                row["best_x_xla"] = best["GBps"] / row["xla"]["GBps"]
        if bi == 0:  # ragged: half the rows hold a quarter of the tokens (their tails are skipped)
            fill = jnp.where(jnp.arange(b) % 2 == 0, c, c // 4)
            rpos = jnp.where(jnp.arange(c)[None, None] < fill[:, None, None], pos, -1)
            rq = jnp.where(fill == c, c - 1, c // 4 - 1).astype(jnp.int32)
            o_ref2, m_ref2 = xla(q, k, v, rpos, rq)
            o2, m2 = pallas(q, k, v, rpos, rq)
            used = int(jnp.sum(fill)) * hk * d * 2 * 2
            row["ragged"] = dict(check=compare(o2, o_ref2, m2, m_ref2, 2.5e-2, 1e-3),
                                 used_kv_bytes=used, xla=rate(used, timed(xla, q, k, v, rpos, rq), copy),
                                 pallas=rate(used, timed(pallas, q, k, v, rpos, rq), copy))
            try:  # jax's stock Pallas GPU decode attention (no mass output), for scale
                if on_gpu():
                    # lazy: a GPU-only Pallas op, imported only where it runs
                    from jax.experimental.pallas.ops.gpu import decode_attention as stock

                    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, C, Hkv, D], outside the timing
                    fn = jax.jit(stock.gqa)
                    o3 = fn(q, kt, vt)
                    row["jax_stock_gqa"] = dict(out_max_abs_err=max_err(o3, o_ref),
                                                **rate(kv_bytes, timed(fn, q, kt, vt), copy))
                    del kt, vt
            except Exception as e:  # noqa: BLE001
                row["jax_stock_gqa"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["rows"].append(row)
        print(f"decode bf16 B={b}: xla {row['xla']['GBps']:.0f} GB/s, pallas {row['pallas']['GBps']:.0f} GB/s "
              f"({row['pallas']['fraction_of_copy']:.2f} of copy, {row['x_xla']:.2f}x xla), check {check['ok']}")
        del k, v
    return out


def bench_quantized(args, copy, results, bits):
    b = 2 if args.quick else 8
    h, hk, d = (8, 2, 64) if args.quick else (32, 8, 128)
    c = 1024 if args.quick else 32768
    dtype = jnp.bfloat16
    k, v, _ = full_cache(jax.random.key(30 + bits), b, hk, c, d, dtype)
    cache = _quantized_from(k, v, bits=bits, group=32, ring=128, dtype=dtype)
    del k, v
    q = jax.random.normal(jax.random.key(40), (b, h, d), dtype)
    q_pos = jnp.full((b,), cache.capacity, jnp.int32)
    arrays, layout = quantized_arrays(cache)
    inputs = (q, *arrays, q_pos)
    nbytes = sum(int(x.nbytes) for x in arrays)
    xla = jax.jit(functools.partial(qa.reference, **layout))
    pallas = jax.jit(functools.partial(qa.quantized_decode_attention, **layout))
    o_ref, m_ref = xla(*inputs)
    o_k, m_k = pallas(*inputs)
    check = compare(o_k, o_ref, m_k, m_ref, 4e-2, 2e-2)  # bf16 dequantized tiles vs an f32 reference
    t_xla, t_pal = timed(xla, *inputs), timed(pallas, *inputs)
    bf16_bytes = 2 * b * hk * cache.capacity * d * 2
    row = dict(bits=bits, B=b, bytes_read=nbytes, bf16_bytes_same_tokens=bf16_bytes, bytes_ratio=bf16_bytes / nbytes,
               check=check, xla_dequantize_then_attend=rate(nbytes, t_xla, copy), pallas=rate(nbytes, t_pal, copy),
               x_xla=t_xla / t_pal)
    if do_sweep(args):  # tiling sweep
        sweep = []
        for bk, w, st in [(64, 8, 2), (64, 4, 2), (32, 4, 2), (128, 8, 2), (64, 8, 3), (128, 8, 3)]:
            cfg = dict(block_k=bk, num_warps=w, num_stages=st)
            try:
                fn = jax.jit(functools.partial(qa.quantized_decode_attention, **layout, **cfg))
                o2, m2 = fn(*inputs)
                ok = compare(o2, o_ref, m2, m_ref, 4e-2, 2e-2)["ok"]
                sweep.append(dict(cfg, ok=ok, **rate(nbytes, timed(fn, *inputs), copy)))
            except Exception as e:  # noqa: BLE001
                sweep.append(dict(cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
        row["sweep"] = sweep
        good = [s for s in sweep if s.get("ok")]
        if good:
            row["best"] = max(good, key=lambda s: s["GBps"])
    bf16 = results.get("decode_bf16", {}).get("rows", [{}])[0]
    if "pallas" in bf16 and bf16.get("B") == b:
        row["x_pallas_bf16"] = bf16["pallas"]["ms"] / row["pallas"]["ms"]
        if "best" in row and "best" in bf16:
            row["best_x_best_bf16"] = bf16["best"]["ms"] / row["best"]["ms"]
    print(f"decode int{bits} B={b}: xla {row['xla_dequantize_then_attend']['ms']:.3f} ms, pallas "
          f"{row['pallas']['ms']:.3f} ms ({row['pallas']['GBps']:.0f} GB/s, {row['x_xla']:.2f}x xla), "
          f"check {check['ok']}")
    return row


def bench_quest(args, copy, results):
    b = 2 if args.quick else 8
    h, hk, d = (8, 2, 64) if args.quick else (32, 8, 128)
    c = 1024 if args.quick else 32768
    ps, n_sel = 16, (8 if args.quick else 64)
    dtype = jnp.bfloat16
    k, v, pos = full_cache(jax.random.key(50), b, hk, c, d, dtype)
    q = jax.random.normal(jax.random.key(51), (b, h, d), dtype)
    pmin, pmax = jax.jit(page_bounds, static_argnums=2)(k, pos, ps)
    n = c // ps
    nonempty = jnp.ones((b, hk, n), bool)
    newest = jnp.full((b, hk), n - 1, jnp.int32)
    sel_x = jax.jit(functools.partial(kq.select_reference, k=n_sel))
    sel_p = jax.jit(functools.partial(kq.select_pages, k=n_sel))
    pr, okr = sel_x(q, pmin, pmax, nonempty, newest)
    pk, okk = sel_p(q, pmin, pmax, nonempty, newest)
    same = float(jnp.mean((pr == pk).astype(jnp.float32)))
    bound_bytes = int(pmin.nbytes + pmax.nbytes)
    out = dict(pages=n, selected=n_sel, page_size=ps,
               select=dict(same_pages_fraction=same, bytes=bound_bytes,
                           xla=rate(bound_bytes, timed(sel_x, q, pmin, pmax, nonempty, newest), copy),
                           pallas=rate(bound_bytes, timed(sel_p, q, pmin, pmax, nonempty, newest), copy)))
    out["select"]["x_xla"] = out["select"]["xla"]["ms"] / out["select"]["pallas"]["ms"]
    table = pr  # attention over the reference's pages
    cache = LayerCache(k=k, v=v, pos=pos, score=jnp.zeros(pos.shape, jnp.float32))
    q_pos = jnp.full((b,), c - 1, jnp.int32)
    att_x = jax.jit(functools.partial(dispatch.paged_decode_attention, page_size=ps, impl="xla"))
    att_p = jax.jit(functools.partial(dispatch.paged_decode_attention, page_size=ps, impl="pallas"))
    ox, mx = att_x(q, cache, q_pos, table, okr)
    ok_, mk = att_p(q, cache, q_pos, table, okr)
    sel_bytes = b * hk * n_sel * ps * d * 2 * 2
    out["attention"] = dict(check=compare(ok_, ox, mk, mx, 2.5e-2, 1e-3), bytes=sel_bytes,
                            xla_gather_then_attend=rate(sel_bytes, timed(att_x, q, cache, q_pos, table, okr), copy),
                            pallas_page_table=rate(sel_bytes, timed(att_p, q, cache, q_pos, table, okr), copy))
    att = out["attention"]
    att["x_xla"] = att["xla_gather_then_attend"]["ms"] / att["pallas_page_table"]["ms"]
    print(f"quest: select {out['select']['x_xla']:.2f}x xla (same pages {same:.3f}), attention "
          f"{out['attention']['x_xla']:.2f}x xla")
    return out


def bench_quant_pack(args, copy, results):
    b, hk, d = (2, 2, 64) if args.quick else (8, 8, 128)
    rows = []
    for t in ((32, 256) if args.quick else (32, 32768)):
        for bits in (4, 8):
            key = jax.random.key(60 + t + bits)
            kx = jax.random.normal(key, (b, hk, t, d), jnp.bfloat16)
            vx = jax.random.normal(jax.random.fold_in(key, 1), (b, hk, t, d), jnp.bfloat16)
            xla = jax.jit(functools.partial(qp.reference, bits=bits, group_size=32))
            pallas = jax.jit(functools.partial(qp.quantize_kv, bits=bits, group_size=32))
            want, got = xla(kx, vx), pallas(kx, vx)
            same = [float(jnp.mean((a == w).astype(jnp.float32))) for a, w in zip(got, want)]
            deq_k = quant.dequantize_keys(got[0], got[1], got[2], bits, 32)
            deq_v = quant.dequantize_values(got[3], got[4], got[5], bits, 32)
            half_k = jnp.repeat(got[1].astype(jnp.float32), 32, axis=-2) / 2
            half_v = jnp.repeat(got[4].astype(jnp.float32), 32, axis=-1) / 2
            within = bool(jnp.all(jnp.abs(deq_k - kx.astype(jnp.float32)) <= half_k * 1.001 + 1e-6)
                          & jnp.all(jnp.abs(deq_v - vx.astype(jnp.float32)) <= half_v * 1.001 + 1e-6))
            moved = int(kx.nbytes + vx.nbytes + sum(int(x.nbytes) for x in want))
            t_x, t_p = timed(xla, kx, vx), timed(pallas, kx, vx)
            rows.append(dict(tokens=t, bits=bits, identical_fraction=dict(zip(
                ("kq", "k_scale", "k_min", "vq", "v_scale", "v_min"), same)), within_half_step=within,
                bytes=moved, xla=rate(moved, t_x, copy), pallas=rate(moved, t_p, copy), x_xla=t_x / t_p))
            print(f"quant-pack T={t} int{bits}: {rows[-1]['x_xla']:.2f}x xla, identical codes "
                  f"{same[0]:.4f}/{same[3]:.4f}, within half step {within}")
    return {"rows": rows}


def bench_snapkv(args, copy, results):
    """XLA window scoring (w = 64) vs one layer's prefill attention at the same prompt length."""
    s = 2048 if args.quick else 32768
    h, hk, d = (8, 2, 64) if args.quick else (32, 8, 128)
    key = jax.random.split(jax.random.key(70), 3)
    q = jax.random.normal(key[0], (1, s, h, d), jnp.bfloat16)
    k = jax.random.normal(key[1], (1, s, hk, d), jnp.bfloat16)
    v = jax.random.normal(key[2], (1, s, hk, d), jnp.bfloat16)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    lengths = jnp.array([s], jnp.int32)

    def score(q, k, pos, lengths):
        ctx = PrefillContext(q=q, k=k, v=k, pos=pos, lengths=lengths, key_mass=None, shared={})
        probs, _ = window_probs(ctx, 64)
        return jnp.sum(probs, axis=2)

    t_score = timed(jax.jit(score), q, k, pos, lengths, iters=3, repeats=3)
    # our prefill attention as a scan over query blocks (non-causal: about twice the causal work)
    prefill = jax.jit(lambda q, k, v, pos: ref_attn.chunk_attention(q, k, v, pos, pos)[0])
    t_prefill = timed(prefill, q, k, v, pos, iters=1, repeats=3)
    out = dict(S=s, window=64, scoring_ms=1e3 * t_score, prefill_attention_scan_one_layer_ms=1e3 * t_prefill,
               scoring_fraction_of_scan_attention=t_score / t_prefill, xla_logits_bytes=h * 64 * s * 4,
               scoring_GBps_if_logits_once=h * 64 * s * 4 / t_score / 1e9)
    try:  # a fused causal attention (cuDNN on GPU when available): the faster prefill baseline
        fused = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
        t_fused = timed(fused, q, k, v, iters=1, repeats=3)
        out.update(fused_causal_attention_one_layer_ms=1e3 * t_fused, scoring_fraction_of_fused=t_score / t_fused)
    except Exception as e:  # noqa: BLE001
        out["fused_causal_attention_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


# ---------------------------------------------------------------------------------------------


def diagnose(row: dict) -> list[str]:
    """Where the time goes, from the numbers of one decode row (hints for the note on a missed goal)."""
    out = []
    t_all, t_kernel = row["pallas"]["ms"], row["pallas_kernel_only"]["ms"]
    out.append(f"kernel alone streams K/V at {row['pallas_kernel_only']['fraction_of_copy']:.2f} of copy; the XLA "
               f"epilogue (split merge + mass) adds {100 * (t_all - t_kernel) / t_all:.0f}% of the time")
    best = row.get("best")
    if best and best["ms"] < 0.95 * t_all:
        cfg = {k: best[k] for k in ("block_k", "num_warps", "num_stages", "num_splits")}
        out.append(f"default tiling is {100 * (t_all / best['ms'] - 1):.0f}% slower than the best swept tiling {cfg}: "
                   "make that the default")
    if row["x_xla"] < 1.0:
        out.append("the kernel is slower than XLA at this shape")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run; interpret mode on CPU)")
    ap.add_argument("--sections", nargs="+",
                    default=["decode_bf16", "decode_int8", "decode_int4", "quest", "quant_pack", "snapkv_scoring"])
    ap.add_argument("--out", default=None, help="default: benchmarks/kernels-<card>.json")
    ap.add_argument("--sweep", action="store_true", help="run the tiling sweeps even off-GPU / with --quick")
    ap.add_argument("--sweep-until", type=float, default=150.0,
                    help="tiling sweeps start only during the first this many seconds (keeps the run ~5 min)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    args.sweep_deadline = t_start + args.sweep_until
    card, bw = device_and_ceiling(args.quick)
    copy = bw["copy_GBps"]
    results: dict = {}
    for name in args.sections:
        if name == "decode_bf16":
            guarded(results, name)(lambda: bench_decode(args, copy, results))
        elif name.startswith("decode_int"):
            bits = int(name[len("decode_int"):])
            guarded(results, name)(lambda bits=bits: bench_quantized(args, copy, results, bits))
        elif name == "quest":
            guarded(results, name)(lambda: bench_quest(args, copy, results))
        elif name == "quant_pack":
            guarded(results, name)(lambda: bench_quant_pack(args, copy, results))
        elif name == "snapkv_scoring":
            guarded(results, name)(lambda: bench_snapkv(args, copy, results))
        else:
            raise SystemExit(f"unknown section {name!r}")

    goals = {}
    rows = results.get("decode_bf16", {}).get("rows", [])
    if rows and "pallas" in rows[0]:
        r = rows[0]
        best = r.get("best", r["pallas"])
        frac = best["fraction_of_copy"] if "fraction_of_copy" in best else r["pallas"]["fraction_of_copy"]
        x = r.get("best_x_xla", r["x_xla"])
        goals[f"decode_bf16_B{r['B']}"] = dict(
            fraction_of_copy=frac, goal_fraction=GOAL_COPY_FRACTION, fraction_met=frac >= GOAL_COPY_FRACTION,
            fraction_shortfall=max(0.0, GOAL_COPY_FRACTION - frac), x_xla=x, goal_x_xla=GOAL_X_XLA,
            x_xla_met=x >= GOAL_X_XLA, x_xla_shortfall=max(0.0, GOAL_X_XLA - x), check_ok=r["check"]["ok"],
            default_tiling=r["pallas"], best_tiling=r.get("best"), diagnosis=diagnose(r))
    q4 = results.get("decode_int4", {})
    if "pallas" in q4:
        goals["int4_faster_than_bf16"] = dict(x_pallas_bf16=q4.get("x_pallas_bf16"),
                                              met=(q4.get("x_pallas_bf16") or 0) > 1.0)
    payload = {"benchmark": "kernels", "card": card, "stubbed_missing_modules": STUBBED, "machine": machine_info(),
               "bandwidth": bw, "quick": args.quick, "goals": goals, "results": results,
               "impl_auto_on_gpu": common.resolve_impl("auto"),
               "notes": ["GB/s count the bytes each function must read (decode: K+V of the resident slots; "
                         "quantized: codes, scales, minimums, ring and positions); fraction_of_copy divides by "
                         "the copy ceiling measured above in this run.",
                         "pallas = kernel + XLA epilogue (split merge, mass); pallas_kernel_only = kernel alone.",
                         "The sweep's best tiling is what the defaults in kernels/decode_attention.py should "
                         "become once confirmed."],
               "wall_s": time.perf_counter() - t_start}
    write_json(args.out or f"benchmarks/kernels-{card}.json", payload)


if __name__ == "__main__":
    main()
