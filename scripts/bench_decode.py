"""Prefill tokens/s and decode ms/token of SmolLM2 on this machine, against the memory roofline.

For each (context, batch): a random prompt of `context` tokens per row, greedy decode of
`--new-tokens` tokens with stop tokens disabled, through the prefill and decode executables that
`PiKVModel.generate` compiles (pikv_jax.eval.speed.DecodeProgram). Protocol (pikv_jax.bench): a
warm-up round, then `--rounds` interleaved rounds over all configurations (round r: every
(context, batch) in turn), first of prefill, then of the decode loop from the prefilled state;
median and min-max reported, every round kept in the JSON. The roofline of a decode step is the
bytes it must read (every parameter once: the tied embedding serves as the output head; plus the
whole allocated KV cache) divided by the read bandwidth measured in the same run.

    python scripts/bench_decode.py                       # 1k and 4k, batch 1 and 4
    python scripts/bench_decode.py --quick --out /tmp/x.json   # tiny random model, whole path, < 1 min
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from pikv_jax.bench import fmt_spread, interleaved_rounds, machine_info, measure_bandwidth, protocol, write_json
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.state import tree_nbytes
from pikv_jax.eval.speed import TINY, DecodeProgram, decode_rounds, load_bench_model, random_prompt, timing_fields


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, contexts 128/512, batches 1/2, "
                    "8 new tokens, 64 MiB bandwidth probe: exercises the whole path in well under a minute")
    ap.add_argument("--out", default="benchmarks/decode-cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.contexts, args.batches, args.new_tokens = TINY, [128, 512], [1, 2], 8
    return args


def main(argv=None):
    args = parse_args(argv)
    bw = measure_bandwidth((64 if args.quick else 512) * 2**20)
    print(f"bandwidth: read {fmt_spread(bw['read_GBps_spread'])} GB/s, copy {fmt_spread(bw['copy_GBps_spread'])} GB/s")
    model = load_bench_model(args.model, dtype=args.dtype)
    param_bytes = tree_nbytes(model.params)
    rng = np.random.default_rng(0)
    configs = {}
    for ctx in args.contexts:
        for b in args.batches:
            prompts = [random_prompt(model, ctx, rng) for _ in range(b)]
            configs[(ctx, b)] = DecodeProgram(model, CachePolicy(), prompts, args.new_tokens)  # compiles
            print(f"compiled ctx {ctx} batch {b} in {configs[(ctx, b)].compile_s:.1f} s", flush=True)
    names = {f"ctx{c}-b{b}": p for (c, b), p in configs.items()}
    print("prefill rounds:")
    pre = interleaved_rounds({n: p.prefill_s for n, p in names.items()}, rounds=args.rounds, self_timed=True,
                             on_round=lambda r, v: print(f"  round {r}: " + " | ".join(
                                 f"{n} {s:.3f}" for n, s in v.items()) + " s", flush=True))
    print("decode rounds:")
    dec = decode_rounds(names, rounds=args.rounds)
    rows = []
    for (ctx, b), prog in configs.items():
        n = f"ctx{ctx}-b{b}"
        d, p = dec.stats(n), pre.stats(n)
        kv_bytes = prog.cache_bytes  # the decode step reads the whole allocated cache
        step_bytes = param_bytes + kv_bytes
        roofline_ms = 1000 * step_bytes / (bw["read_GBps"] * 1e9)
        toks = prog.prompt_tokens
        prefill_tps = {"median": toks / p["median"], "min": toks / p["max"], "max": toks / p["min"],
                       "rounds": [toks / s for s in p["rounds"]]}
        row = dict(context=ctx, batch=b, **timing_fields("prefill_tokens_per_s", prefill_tps),
                   prefill_s_warmup=pre.warmup[n],
                   **timing_fields("decode_ms_per_token", d, dec.warmup[n]),
                   decode_tokens_per_s=1000 * b / d["median"], param_bytes=param_bytes,
                   kv_bytes_read_per_step=kv_bytes, bytes_per_step=step_bytes, roofline_ms=roofline_ms,
                   x_of_roofline=d["median"] / roofline_ms,
                   x_of_roofline_range=[d["min"] / roofline_ms, d["max"] / roofline_ms],
                   achieved_GBps=step_bytes / (d["median"] / 1000) / 1e9, compile_s=prog.compile_s)
        rows.append(row)
        print(f"ctx {ctx:5d} batch {b}: prefill {fmt_spread(prefill_tps, '.0f')} tok/s | "
              f"decode {fmt_spread(d, '.2f')} ms/step (roofline {roofline_ms:5.1f} ms, {row['x_of_roofline']:.2f}x)")
    write_json(args.out, {"benchmark": "decode", "model": args.model, "dtype": args.dtype, "quick": args.quick,
                          "new_tokens": args.new_tokens, "decode_steps_timed": args.new_tokens - 1,
                          "timed": "the compiled prefill, and the compiled decode loop from a copy of the prefilled "
                                   "state (the executables generate() runs); compile, cache allocation and the "
                                   "state copy are outside the timers",
                          "protocol": protocol(args.rounds, 1), "order": [f"{r}:{n}" for r, n in dec.order],
                          "bandwidth": bw, "machine": machine_info(), "results": rows})
    jax.clear_caches()


if __name__ == "__main__":
    main()
