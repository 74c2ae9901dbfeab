"""Prefill tokens/s and decode ms/token of SmolLM2 on this machine, against the memory roofline.

For each (context, batch): a random prompt of `context` tokens per row, greedy decode of
`--new-tokens` tokens with stop tokens disabled. The roofline of a decode step is the bytes it must
read (every parameter once: the tied embedding serves as the output head; plus the whole allocated
KV cache) divided by the read bandwidth measured in the same run.

    python scripts/bench_decode.py                       # 1k and 4k, batch 1 and 4
    python scripts/bench_decode.py --contexts 1024 --batches 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import machine_info, measure_bandwidth, write_json
from pikv_jax.cache.state import tree_nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/decode-cpu.json")
    args = ap.parse_args()

    bw = measure_bandwidth()
    print(f"bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    model = PiKVModel.from_pretrained(args.model, dtype=args.dtype)
    param_bytes = tree_nbytes(model.params)
    rng = np.random.default_rng(0)
    rows = []
    for ctx in args.contexts:
        for b in args.batches:
            prompts = [rng.integers(100, model.config.vocab_size, ctx).tolist() for _ in range(b)]
            model.generate(prompts, args.new_tokens, stop_ids=())  # compile + warm up
            out = model.generate(prompts, args.new_tokens, stop_ids=())
            s = out.stats
            kv_bytes = s["cache_bytes"]  # the decode step reads the whole allocated cache
            step_bytes = param_bytes + kv_bytes
            roofline_ms = 1000 * step_bytes / (bw["read_GBps"] * 1e9)
            row = dict(context=ctx, batch=b, prefill_tokens_per_s=s["prefill_tokens_per_s"],
                       decode_ms_per_token=s["decode_ms_per_token"], decode_tokens_per_s=s["decode_tokens_per_s"],
                       param_bytes=param_bytes, kv_bytes_read_per_step=kv_bytes, bytes_per_step=step_bytes,
                       roofline_ms=roofline_ms, x_of_roofline=s["decode_ms_per_token"] / roofline_ms,
                       achieved_GBps=step_bytes / (s["decode_ms_per_token"] / 1000) / 1e9,
                       compile_s=s["compile_s"])
            rows.append(row)
            print(f"ctx {ctx:5d} batch {b}: prefill {row['prefill_tokens_per_s']:7.1f} tok/s | decode "
                  f"{row['decode_ms_per_token']:6.1f} ms/step (roofline {roofline_ms:5.1f} ms, "
                  f"{row['x_of_roofline']:.2f}x)")
    write_json(args.out, {"benchmark": "decode", "model": args.model, "dtype": args.dtype,
                          "new_tokens": args.new_tokens, "bandwidth": bw, "machine": machine_info(),
                          "results": rows})
    jax.clear_caches()


if __name__ == "__main__":
    main()
