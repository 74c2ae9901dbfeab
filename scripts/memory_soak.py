"""Memory of a long-lived process on SmolLM2: many `generate` calls with distinct prompt lengths and
policies, the process's memory maps and RSS after each.

The reported crash: 40 such calls grew a process to 53,659 maps and 6.6 GiB RSS, then LLVM could
not allocate and the process died (each compiled program kept ~1,300 maps and ~140 MB alive). With
programs released when dropped and prompt widths bucketed, maps and RSS must level off once the
LRU of compiled programs (`PiKVModel.MAX_COMPILED`) is full.

    python scripts/memory_soak.py                     # 40 calls -> benchmarks/memory-smollm2.json
    python scripts/memory_soak.py --calls 6 --model random:mixtral-tiny --max-prompt 100 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import machine_info, memory_maps, rss_mb, write_json
from pikv_jax.eval.methods import parse_method

METHODS = ("full", "h2o@0.5", "int4", "snapkv@0.5", "streaming_llm@0.25", "h2o@0.25+int4")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--max-prompt", type=int, default=900, help="prompt lengths are drawn from 16..max-prompt")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/memory-smollm2.json")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.max_prompt < 16:
        raise SystemExit("pikv: --calls must be >= 1 and --max-prompt >= 16")

    model = PiKVModel.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    vocab = model.config.vocab_size
    base = dict(maps=memory_maps(), rss_mb=rss_mb())
    rows = []
    t0 = time.perf_counter()
    for i in range(args.calls):
        spec = METHODS[i % len(METHODS)]
        method = parse_method(spec, model=model, context_len=args.max_prompt)
        n = int(rng.integers(16, args.max_prompt + 1))
        prompt = rng.integers(3, vocab, size=n).tolist()
        out = model.generate([prompt], args.new_tokens, policy=method.policy, seed=i)
        rows.append(dict(call=i, method=method.label, prompt_tokens=n, compiled=bool(out.stats["compile_s"] > 0),
                         maps=memory_maps(), rss_mb=round(rss_mb(), 1)))
        print(f"call {i:3d} {method.label:16s} {n:4d} tokens  compiled={rows[-1]['compiled']!s:5s} "
              f"maps {rows[-1]['maps']:6d}  rss {rows[-1]['rss_mb']:8.1f} MiB", flush=True)
    half = len(rows) // 2
    late = rows[half:]
    summary = dict(calls=len(rows), programs_compiled=sum(r["compiled"] for r in rows),
                   max_compiled=model.MAX_COMPILED, maps_max=max(r["maps"] for r in rows),
                   rss_max_mb=max(r["rss_mb"] for r in rows),
                   maps_growth_second_half=late[-1]["maps"] - late[0]["maps"],
                   rss_growth_second_half_mb=round(late[-1]["rss_mb"] - late[0]["rss_mb"], 1),
                   seconds=round(time.perf_counter() - t0, 1))
    payload = dict(benchmark="memory-soak", model=args.model, methods=list(METHODS), new_tokens=args.new_tokens,
                   before_first_call=base, summary=summary, calls=rows, machine=machine_info())
    write_json(args.out, payload)
    print(summary)
    return payload


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad --model and the like: one line, no traceback
        raise SystemExit(f"pikv: {e}") from None
