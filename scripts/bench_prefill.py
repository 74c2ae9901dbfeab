"""Prefill cost of the scoring methods against a plain prefill: SmolLM2 on this machine, batch 1.

KVzip scores the prompt by a reconstruction pass (instruction + the context again, in chunks), so
its prefill does more work than a plain one; SnapKV, Expected Attention and the other prefill
scorers add little. For each method: a `--context`-token prompt of varied text through the prefill
executable `PiKVModel.generate` compiles for it (pikv_jax.eval.speed.DecodeProgram, the policy bound
as generate binds it). Protocol (pikv_jax.bench): a warm-up round, then `--rounds` interleaved
rounds over the methods; median and min-max seconds, ratios to the full cache's prefill from the
medians with their range from the per-round ratios.

    python scripts/bench_prefill.py                           # 2k context -> benchmarks/prefill-cpu.json
    python scripts/bench_prefill.py --quick --out /tmp/x.json  # tiny random model, whole path, < 1 min
"""

from __future__ import annotations

import argparse

import jax

from pikv_jax.bench import fmt_spread, interleaved_rounds, machine_info, protocol, write_json
from pikv_jax.eval.methods import parse_methods
from pikv_jax.eval.speed import TINY, DecodeProgram, load_bench_model, ratio_fields, timing_fields, varied_prompt

DEFAULT_METHODS = ("full;snapkv@0.25;expected_attention@0.25;kvzip@0.25;adakv(kvzip)@0.25;"
                   "adakv(kvzip(budget_scope=global))@0.25")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="method specs separated by ';' (full first)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 256-token context")
    ap.add_argument("--out", default="benchmarks/prefill-cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.context = TINY, 256
    if args.rounds < 5:
        ap.error(f"--rounds: at least 5 (the timing protocol), got {args.rounds}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load_bench_model(args.model)
    prompt = varied_prompt(model, args.context)
    methods = parse_methods([m for m in args.methods.split(";") if m.strip()], model=model, context_len=args.context)
    if not methods[0].is_full:
        raise SystemExit("bench_prefill: --methods: the first method must be 'full' (the ratios' base)")
    progs = {}
    for m in methods:
        progs[m.label] = DecodeProgram(model, m.policy, [prompt], 2)  # compiles; one prefill outside the rounds
        print(f"compiled {m.label} in {progs[m.label].compile_s:.1f} s", flush=True)
    res = interleaved_rounds({n: p.prefill_s for n, p in progs.items()}, rounds=args.rounds, self_timed=True,
                             on_round=lambda r, v: print(f"  round {r}: " + " | ".join(
                                 f"{n} {s:.2f}" for n, s in v.items()) + " s", flush=True))
    full = methods[0].label
    rows = []
    for label, prog in progs.items():
        s = res.stats(label)
        r = res.ratio(label, full)
        rows.append(dict(method=label, context=args.context, batch=1,
                         **timing_fields("prefill_s", s, res.warmup[label]),
                         **ratio_fields("ratio_vs_full", r), prefill_tokens_per_s=prog.prompt_tokens / s["median"],
                         compile_s=prog.compile_s, cache_bytes=prog.cache_bytes))
        print(f"{label:45s} prefill {fmt_spread(s, '.2f')} s, {fmt_spread(r, '.2f')}x the full cache's")
    write_json(args.out, {"benchmark": "prefill", "model": args.model, "context": args.context, "quick": args.quick,
                          "timed": "the compiled prefill executable generate() runs, from a fresh empty cache "
                                   "(allocated outside the timer)",
                          "protocol": protocol(args.rounds, 1), "order": [f"{r}:{n}" for r, n in res.order],
                          "machine": machine_info(), "results": rows})
    jax.clear_caches()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
