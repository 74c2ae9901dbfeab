"""`pikv bench-serve`: replay a seeded serving workload against the engine or a running server.

    pikv bench-serve --method h2o@0.25+int4 --cache-memory 256MiB --requests 16 --rate 2
    pikv bench-serve --url http://127.0.0.1:8000 --requests 200 --concurrency 16
    pikv bench-serve --method full --slots 4 --static-baseline     # also generate() in static batches

Poisson arrivals, prompt and output lengths uniform in the given ranges, prompts cut from the
bundled text (tokenized by --model), fixed seed. Prints one summary line per run and writes the
metrics as JSON with --out. Timings are one run: for medians over rounds use scripts/bench_serve.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="the model to serve (engine mode) or to tokenize prompts with")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--method", default="full", help="cache method spec (engine mode), as in `pikv eval --methods`")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cache-memory", default=None, metavar="SIZE", help="cache pool memory, e.g. 256MiB")
    size.add_argument("--slots", type=int, default=None, help="number of cache slots (default: --cache-memory 1GiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps-per-visit", type=int, default=8)
    p.add_argument("--url", default=None, help="replay against this server (pikv serve), not an in-process engine")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (server mode)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (default: all at once)")
    p.add_argument("--prompt-min", type=int, default=512)
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--output-min", type=int, default=32)
    p.add_argument("--output-max", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-baseline", action="store_true",
                   help="engine mode: also run the workload through generate() in static batches of the slot count")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")


def _line(name: str, st: dict) -> str:
    return (f"[pikv] {name}: {st['output_tokens']} tokens in {st['wall_s']:.1f} s = {st['output_tokens_per_s']:.1f} "
            f"tok/s, {st['requests_per_s']:.3f} req/s, TTFT p50/p99 {st['ttft_ms']['median']:.0f}/"
            f"{st['ttft_ms']['p99']:.0f} ms, ITL p50/p99 {st['itl_ms']['median']:.1f}/{st['itl_ms']['p99']:.1f} ms")


def cmd_bench_serve(args) -> int:
    from pikv_jax.api import PiKVModel
    from pikv_jax.eval import passkey
    from pikv_jax.serve.workload import WorkloadSpec, make_workload

    spec = WorkloadSpec(n_requests=args.requests, rate=args.rate, prompt_min=args.prompt_min,
                        prompt_max=args.prompt_max, output_min=args.output_min, output_max=args.output_max,
                        seed=args.seed)
    if args.prompt_max > args.max_prompt_tokens or args.output_max > args.max_new_tokens:
        raise ValueError(f"--prompt-max ({args.prompt_max}) / --output-max ({args.output_max}) exceed the pool's "
                         f"--max-prompt-tokens ({args.max_prompt_tokens}) / --max-new-tokens ({args.max_new_tokens})")
    model = PiKVModel.from_pretrained(args.model, cache_dtype=args.cache_dtype)
    if model.tokenizer is not None:
        source = model.encode(passkey.haystack_text("varied"))
        while len(source) < args.prompt_max * 2:
            source = source + source
    else:
        import numpy as np

        source = np.random.default_rng(args.seed).integers(3, model.config.vocab_size, args.prompt_max * 2).tolist()
    workload = make_workload(spec, source)
    out: dict = dict(workload=vars(spec) | dict(rate=str(spec.rate)), model=args.model)
    if args.url:
        from pikv_jax.serve.client import replay_http

        r = replay_http(args.url, workload, concurrency=args.concurrency)
        out["server"] = r["stats"]
        print(_line(args.url, r["stats"]), file=sys.stderr)
        if r["stats"]["n_errors"]:
            print(f"[pikv] {r['stats']['n_errors']} requests failed, e.g. {r['stats']['errors'][0]}", file=sys.stderr)
    else:
        from pikv_jax.eval.methods import parse_method
        from pikv_jax.serve.engine import Engine, warmup
        from pikv_jax.serve.workload import replay_engine, replay_static

        policy = parse_method(args.method, model=model, context_len=args.max_prompt_tokens).policy
        engine = Engine(model, policy, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                        num_slots=args.slots, cache_memory=None if args.slots else (args.cache_memory or "1GiB"),
                        steps_per_visit=args.steps_per_visit)
        print(f"[pikv] {engine.policy.label}: {engine.num_slots} slots x {engine.slot_bytes:,} bytes; compiled in "
              f"{warmup(engine):.1f} s", file=sys.stderr)
        r = replay_engine(engine, workload)
        engine.shutdown()
        out["engine"] = r["stats"]
        print(_line(f"engine {engine.policy.label}", r["stats"]), file=sys.stderr)
        if args.static_baseline:
            s = replay_static(model, engine.policy, workload, engine.num_slots)
            out["static"] = s["stats"]
            print(_line(f"generate, static batches of {engine.num_slots}", s["stats"]), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"[pikv] wrote {args.out}", file=sys.stderr)
    return 0
