"""Serving at one fixed cache memory budget: what compression buys in concurrent requests and tokens/s.

For each method (default: full, h2o@0.25, int4, h2o@0.25+int4, quest@0.25) an `Engine` gets the same
cache memory (`--full-slots` times one full bf16 slot, or `--cache-memory`); the slots that fit come
from the bytes of one slot under the method, measured from the arrays. One seeded workload (Poisson
arrivals, prompt and output lengths uniform in the given ranges, prompts cut from the bundled
text) is replayed against every engine, and through `generate` in static batches of the full
cache's slot count (the baseline). Protocol of pikv_jax.bench: a warm-up round (compiles), then
`--rounds` interleaved rounds; per configuration the median and min-max over rounds of output
tokens/s, requests/s, and the rounds' median / p99 time to first token and inter-token latency.
Then passkey accuracy through each engine (`--passkey-cases` cases at `--passkey-context` tokens,
query-aware), so each row's speed comes with what it keeps of the answer.

On CPU the prefill of 1-2k-token prompts dominates wall time, so the slot gains show mostly in
decode-bound stretches; the JSON keeps decode seconds and busy slots to show where time went.

    python scripts/bench_serve.py                               # SmolLM2, about 30 min on 2 cores
    python scripts/bench_serve.py --quick --out /tmp/serve.json  # tiny random model, ~2 min
"""

from __future__ import annotations

import argparse
import sys
import time

from pikv_jax.bench import fmt_spread, interleaved_rounds, machine_info, protocol, spread, write_json
from pikv_jax.eval import passkey
from pikv_jax.eval.methods import parse_method
from pikv_jax.eval.speed import TINY, load_bench_model, random_prompt
from pikv_jax.serve.engine import Engine, Request, warmup
from pikv_jax.serve.workload import WorkloadSpec, make_workload, replay_engine, replay_static

STATIC = "generate (static batches, full)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="full,h2o@0.25,int4,h2o@0.25+int4,quest@0.25")
    ap.add_argument("--full-slots", type=float, default=2.0, help="cache memory = this many full bf16 slots")
    ap.add_argument("--cache-memory", default=None, help="cache memory, e.g. 256MiB (overrides --full-slots)")
    ap.add_argument("--max-prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps-per-visit", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals, requests/s (inf: all at 0)")
    ap.add_argument("--prompt-min", type=int, default=1024)
    ap.add_argument("--prompt-max", type=int, default=1536)
    ap.add_argument("--output-min", type=int, default=64)
    ap.add_argument("--output-max", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--passkey-cases", type=int, default=4)
    ap.add_argument("--passkey-context", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="tiny random model, small workload (checks the script)")
    ap.add_argument("--out", default="benchmarks/serve-cpu.json")
    return ap.parse_args(argv)


def token_source(model, n: int) -> list[int]:
    """A long token sequence: the bundled varied text, tokenized (random ids without a tokenizer)."""
    if model.tokenizer is None:
        import numpy as np

        return random_prompt(model, n, np.random.default_rng(0))
    ids = model.encode(passkey.haystack_text("varied"))
    while len(ids) < n:
        ids = ids + ids
    return ids


def passkey_accuracy(engine: Engine, model, cases) -> dict:
    codec = passkey.codec_for(model)
    handles = [engine.submit(Request(prompt=list(c.prompt), max_new_tokens=8)) for c in cases]
    engine.run_until_idle(timeout=3600)
    hits = [passkey.score_answer(codec.decode(h.tokens), c.answer) for h, c in zip(handles, cases)]
    return dict(correct=int(sum(hits)), n=len(hits), accuracy=sum(hits) / len(hits))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.model, args.requests, args.prompt_min, args.prompt_max = TINY, 6, 96, 200
        args.output_min, args.output_max, args.max_prompt_tokens, args.max_new_tokens = 8, 24, 256, 32
        args.rounds, args.passkey_cases, args.passkey_context = 2, 2, 200
        args.methods = "full,h2o@0.25,int4"
    model = load_bench_model(args.model, cache_dtype="bfloat16")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    P, N = args.max_prompt_tokens, args.max_new_tokens

    def engine_for(spec, **kw):
        policy = parse_method(spec, model=model, context_len=P).policy
        return Engine(model, policy, max_prompt_tokens=P, max_new_tokens=N, steps_per_visit=args.steps_per_visit,
                      **kw)

    full_slot = engine_for("full", num_slots=1).slot_bytes
    memory = args.cache_memory or int(args.full_slots * full_slot)
    engines = {spec: engine_for(spec, cache_memory=memory) for spec in methods}
    # compile only the prompt buckets the workload and the passkey cases use
    lengths = list(range(args.prompt_min, args.prompt_max + 1, 16)) + [args.prompt_max, args.passkey_context + 32]
    widths = sorted({model.prompt_width([[0] * min(n, P)]) for n in lengths})
    for spec, e in engines.items():
        t = warmup(e, widths)
        print(f"[serve] {spec}: {e.num_slots} slots of {e.slot_bytes / 2**20:.2f} MiB, compiled in {t:.0f} s",
              file=sys.stderr)
    spec = WorkloadSpec(n_requests=args.requests, rate=args.rate, prompt_min=args.prompt_min,
                        prompt_max=args.prompt_max, output_min=args.output_min, output_max=args.output_max,
                        seed=args.seed)
    workload = make_workload(spec, token_source(model, args.prompt_max * 4))
    static_batch = engines["full"].num_slots if "full" in engines else 1
    full_policy = parse_method("full", model=model, context_len=P).policy

    runs: dict[str, list[dict]] = {k: [] for k in list(engines) + [STATIC]}

    def engine_run(spec):
        def go():
            r = replay_engine(engines[spec], workload)
            runs[spec].append(r["stats"])
            return r["stats"]["output_tokens_per_s"]
        return go

    def static_run():
        r = replay_static(model, full_policy, workload, static_batch)
        runs[STATIC].append(r["stats"])
        return r["stats"]["output_tokens_per_s"]

    configs = {k: engine_run(k) for k in engines} | {STATIC: static_run}
    t0 = time.perf_counter()
    rounds = interleaved_rounds(configs, rounds=args.rounds, warmup=args.warmup, self_timed=True,
                                on_round=lambda r, v: print(f"[serve] round {r}: " + ", ".join(
                                    f"{k} {x:.1f} tok/s" for k, x in v.items()), file=sys.stderr))
    for k in runs:  # drop the warm-up rounds' stats
        runs[k] = runs[k][args.warmup:]
    cases = passkey.build_cases(passkey.codec_for(model), contexts=[args.passkey_context],
                                depths=[(i + 0.5) / args.passkey_cases for i in range(args.passkey_cases)],
                                seeds=[0], haystacks=["varied"])
    rows = []
    for k in configs:
        st = runs[k]
        e = engines.get(k)
        row = dict(method=k, slots=e.num_slots if e else static_batch,
                   slot_bytes=e.slot_bytes if e else full_slot,
                   cache_bytes_allocated=e.cache_bytes_allocated if e else static_batch * full_slot,
                   output_tokens_per_s=rounds.stats(k),
                   requests_per_s=spread([s["requests_per_s"] for s in st]),
                   ttft_ms_median=spread([s["ttft_ms"]["median"] for s in st]),
                   ttft_ms_p99=spread([s["ttft_ms"]["p99"] for s in st]),
                   itl_ms_median=spread([s["itl_ms"]["median"] for s in st]),
                   itl_ms_p99=spread([s["itl_ms"]["p99"] for s in st]),
                   wall_s=spread([s["wall_s"] for s in st]))
        if e:
            row.update(slots_busy_mean=spread([s["slots_busy_mean"] for s in st]),
                       evicted_tokens=st[-1]["evicted_tokens"], policy=e.policy.label,
                       passkey=passkey_accuracy(e, model, cases) if args.passkey_cases else None)
            e.shutdown()
        rows.append(row)
    elapsed = time.perf_counter() - t0
    payload = dict(
        meta=dict(machine=machine_info(), model=args.model, cache_dtype="bfloat16", cache_memory_bytes=memory,
                  full_slot_bytes=full_slot, max_prompt_tokens=P, max_new_tokens=N,
                  steps_per_visit=args.steps_per_visit, workload=vars(spec) | dict(rate=str(spec.rate)),
                  static_batch=static_batch, passkey=dict(cases=args.passkey_cases, context=args.passkey_context,
                                                          mode="query_aware"),
                  protocol=protocol(args.rounds, args.warmup), elapsed_s=elapsed,
                  command="python scripts/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  notes=["ratio budgets are token budgets of the slot: ceil(ratio x max_prompt_tokens)",
                         "CPU: prefill dominates wall time; decode-bound stretches show the slot gains"]),
        rows=rows, table=table(rows))
    write_json(args.out, payload)
    print(payload["table"])
    return 0


def table(rows) -> str:
    out = ["| method | slots | output tok/s | req/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | passkey |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        pk = r.get("passkey")
        acc = f"{pk['correct']}/{pk['n']}" if pk else "-"
        out.append(f"| {r['method']} | {r['slots']} | {fmt_spread(r['output_tokens_per_s'], '.1f')} | "
                   f"{fmt_spread(r['requests_per_s'], '.3f')} | {r['ttft_ms_median']['median']:.0f} / "
                   f"{r['ttft_ms_p99']['median']:.0f} | {r['itl_ms_median']['median']:.0f} / "
                   f"{r['itl_ms_p99']['median']:.0f} | {acc} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
