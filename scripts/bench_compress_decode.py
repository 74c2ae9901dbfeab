"""Decode speed of quantized KV caches against the full bf16 cache: SmolLM2 on this CPU, batch 1.

For each cache (full bf16, KIVI int8, KIVI int4; G=32, R=128): a random prompt of `--context`
tokens, greedy decode of `--new-tokens` tokens with stop tokens disabled, through the executables
`PiKVModel.generate(policy=...)` compiles (pikv_jax.eval.speed.DecodeProgram), run once per cache as
`generate` runs them (end-to-end stats, the cold first run). Then the same compiled decode loop is
timed alone from the prefilled state by the protocol of pikv_jax.bench: a warm-up round, then
`--rounds` interleaved rounds over the caches; median and min-max reported, every round kept, ratios
to the full cache from the medians with their range from the per-round ratios. On a shared machine
interleaving spreads others' load evenly. Bytes read per decode step = every parameter once (the
tied embedding is the output head) + the cache arrays attention reads (keys and values, or codes +
scales + minimums + the full-precision ring, and positions). The roofline divides them by the read
bandwidth measured in the same run.

A second table isolates one layer's decode attention at the same context (jitted; a warm-up round,
then `--repeats` interleaved rounds): dense bf16 attention against dequantize-then-attend, the
unfused path that the fused kernels issue replaces.

    python scripts/bench_compress_decode.py                        # 4k context, 32 new tokens
    python scripts/bench_compress_decode.py --quick --out /tmp/x.json   # tiny random model, < 1 min
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import fmt_spread, interleaved_rounds, machine_info, measure_bandwidth, protocol, write_json
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, init_policy_cache
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.cache.state import LayerCache, tree_nbytes
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.eval.speed import (
    TINY,
    DecodeProgram,
    decode_rounds,
    load_bench_model,
    random_prompt,
    ratio_fields,
    timing_fields,
)

READ_FIELDS = {LayerCache: ("k", "v", "pos"),
               QuantizedLayerCache: ("kq", "k_scale", "k_min", "vq", "v_scale", "v_min", "k_res", "v_res", "pos")}
FULL = "full-bf16"


def policies(group: int | None, residual: int | None) -> dict:
    """The bf16 cache and KIVI int8 / int4 (their defaults unless --group-size / --residual-length)."""
    kw = {k: v for k, v in (("group_size", group), ("residual_length", residual)) if v is not None}
    return {FULL: CachePolicy(), "int8": QuantizedPolicy(bits=8, **kw), "int4": QuantizedPolicy(bits=4, **kw)}


def cache_shapes(model: PiKVModel, policy, prompt_len: int, new_tokens: int):
    cfg = model.config
    caps = tuple(policy.capacity_for(i, prompt_len, new_tokens) for i in range(cfg.num_hidden_layers))
    return jax.eval_shape(lambda: init_policy_cache(policy, 1, caps, num_kv_heads=cfg.num_key_value_heads,
                                                    head_dim=cfg.dim_per_head, dtype=model.cache_dtype))


def kv_bytes_read(cache) -> int:
    """Bytes of the arrays a decode step's attention reads, over all layers."""
    return sum(tree_nbytes([getattr(layer, f) for f in READ_FIELDS[type(layer)]]) for layer in cache.layers)


def attention_microbench(model: PiKVModel, pols: dict, context: int, repeats: int) -> list[dict]:
    """One layer's decode attention over a filled cache of `context` tokens, per policy."""
    cfg = model.config
    rng = np.random.default_rng(0)
    hk, d, h = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_attention_heads
    k = jnp.asarray(rng.normal(size=(1, context, hk, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, context, hk, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, context, h, d)), jnp.float32)
    pos = jnp.arange(context, dtype=jnp.int32)[None]
    ctx = PrefillContext(q=q, k=k, v=v, pos=pos, lengths=jnp.array([context]), key_mass=None, shared={})
    caches, fns = {}, {}
    for name, policy in pols.items():
        caches[name] = policy.prefill(0, policy.init_layer_cache(0, 1, hk, context, d, model.cache_dtype), ctx)
        fns[name] = jax.jit(functools.partial(lambda p, c, qq: p.attend(0, c, qq, jnp.array([context - 1]))[0], policy))
    q_last = q[:, -1]
    res = interleaved_rounds({name: functools.partial(fns[name], caches[name], q_last) for name in pols},
                             rounds=repeats)  # the warm-up round compiles
    rows = []
    for name in pols:
        cache, t = caches[name], res.stats(name)
        ms = {k: 1000 * t[k] for k in ("median", "min", "max")} | {"rounds": [1000 * x for x in t["rounds"]]}
        rows.append(dict(cache=name, layer_cache_bytes=cache.nbytes(),
                         kv_bytes_read=tree_nbytes([getattr(cache, f) for f in READ_FIELDS[type(cache)]]),
                         **timing_fields("attention_ms", ms), **ratio_fields("ms_vs_full", res.ratio(name, FULL))))
        print(f"  attention {name:10s}: {fmt_spread(ms, '.3f')} ms/layer, "
              f"{rows[-1]['kv_bytes_read'] / 2**20:6.2f} MiB read")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=None, help="default: KIVI's per-bits default (32; 64 at int8)")
    ap.add_argument("--residual-length", type=int, default=None, help="default: QuantizedPolicy's (64)")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved rounds of the attention microbenchmark")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed decode rounds (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 512-token context, 8 new tokens, "
                    "64 MiB bandwidth probe: exercises the whole path in well under a minute")
    ap.add_argument("--out", default="benchmarks/compress-decode-cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.context, args.new_tokens, args.repeats = TINY, 512, 8, 5

    bw = measure_bandwidth((64 if args.quick else 512) * 2**20)
    print(f"bandwidth: read {fmt_spread(bw['read_GBps_spread'])} GB/s, copy {fmt_spread(bw['copy_GBps_spread'])} GB/s")
    model = load_bench_model(args.model, dtype=args.dtype, cache_dtype="bfloat16")
    param_bytes = tree_nbytes(model.params)
    prompt = random_prompt(model, args.context, np.random.default_rng(0))
    pols = policies(args.group_size, args.residual_length)
    programs = {name: DecodeProgram(model, policy, [prompt], args.new_tokens) for name, policy in pols.items()}
    outs = {name: prog.run_once() for name, prog in programs.items()}  # generate's stats and text, cold run
    res = decode_rounds(programs, rounds=args.rounds)  # interleaved: others' load hits every cache alike
    rows = []
    for name, policy in pols.items():
        s, d = outs[name].stats, res.stats(name)
        kv = kv_bytes_read(cache_shapes(model, policy, len(prompt), args.new_tokens))
        step = param_bytes + kv
        roof = 1000 * step / (bw["read_GBps"] * 1e9)
        rows.append(dict(cache=name, policy=s["policy"], **timing_fields("decode_ms_per_token", d, res.warmup[name]),
                         **ratio_fields("ms_vs_full", res.ratio(name, FULL)),
                         cold_generate_decode_ms_per_token=s["decode_ms_per_token"],
                         prefill_s=s["prefill_s"], cache_bytes=s["cache_bytes"], full_cache_bytes=s["full_cache_bytes"],
                         param_bytes=param_bytes, kv_bytes_read_per_step=kv, bytes_per_step=step,
                         roofline_ms=roof, x_of_roofline=d["median"] / roof,
                         x_of_roofline_range=[d["min"] / roof, d["max"] / roof],
                         achieved_GBps=step / (d["median"] / 1000) / 1e9, compile_s=s["compile_s"],
                         text=outs[name].texts[0][:60]))
        r = rows[-1]
        print(f"{name:10s}: decode {fmt_spread(d, '.2f')} ms/token, {fmt_spread(res.ratio(name, FULL), '.2f')}x full "
              f"| bytes/step {step / 2**20:7.1f} MiB (KV {kv / 2**20:6.1f} MiB) | roofline {roof:6.2f} ms "
              f"({r['x_of_roofline']:.2f}x)")
    for r in rows:
        r["kv_bytes_vs_full"] = r["kv_bytes_read_per_step"] / rows[0]["kv_bytes_read_per_step"]
    print("one layer's decode attention:")
    attn = attention_microbench(model, pols, args.context + args.new_tokens, args.repeats)
    write_json(args.out, {"benchmark": "compress-decode", "model": args.model, "dtype": args.dtype,
                          "quick": args.quick, "cache_dtype": "bfloat16", "context": args.context, "batch": 1,
                          "new_tokens": args.new_tokens,
                          "kivi": {k: {"group_size": p.group_size, "residual_length": p.residual_length}
                                   for k, p in pols.items() if k != FULL}, "protocol": protocol(args.rounds, 1),
                          "order": [f"{r}:{n}" for r, n in res.order],
                          "attention_protocol": protocol(args.repeats, 1), "bandwidth": bw,
                          "machine": machine_info(), "results": rows, "attention_one_layer": attn})


if __name__ == "__main__":
    main()
