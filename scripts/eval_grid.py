"""The evaluation grid behind the README table: SmolLM2 at a 2k context, budgets of 50% and 25%.

For every policy in the grid (those of the issue, plus adakv / quest / duo_attention when they are
registered) and each budget: passkey accuracy (query-aware and query-agnostic), perplexity change
and KL / top-1 against the full cache with a compressed 1k prefix, kept and allocated cache bytes,
decode ms/token; then decode ms/token at 4k for the full cache against 25% budgets, and StreamingLLM
perplexity with decode-time eviction on a text four times longer than its 512-token cache.

Writes benchmarks/eval-smollm2.json, .png (accuracy against kept bytes) and .md (the README
table). Interrupted runs resume (finished units are kept in benchmarks/eval-smollm2.partial.jsonl).

    python scripts/eval_grid.py                      # the grid (about an hour on 2 idle cores)
    python scripts/eval_grid.py --estimate           # print the plan and a time estimate only
    python scripts/eval_grid.py --contexts 1024,2048,4096 --depths 0,0.25,0.5,0.75,1 --seeds 0,1,2 --keys 1,3
"""

from __future__ import annotations

import argparse
import sys
import time

GRID_POLICIES = ("streaming_llm", "h2o", "tova", "lru", "knorm", "snapkv", "pyramidkv")
OPTIONAL_POLICIES = ("adakv", "quest", "duo_attention")

# rough CPU costs of SmolLM2 on 2 idle cores (seconds), for the estimate only
PREFILL_TOK_S = {1024: 300.0, 2048: 220.0, 4096: 170.0}
COMPILE_S = 20.0
DECODE_STEP_S = 0.06
RULER_NEW_TOKENS = 48  # answer-sized generation (ruler.answer_tokens) on SmolLM2's longest answers
KVZIP_PREFILL_X = 3.4  # KVzip's prefill (uncached forward + chunked repeat pass + selecting prefill), measured


def prefill_weight(methods) -> float:
    """Plain prefills' worth of work per case, summed over `methods` (KVzip-scored ones cost more)."""
    return sum(KVZIP_PREFILL_X if "kvzip" in m else 1.0 for m in methods)


def _csv(cast):
    return lambda s: [cast(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--policies", type=_csv(str), default=None, help="default: the grid policies present")
    ap.add_argument("--budgets", type=_csv(str), default=["0.5", "0.25"])
    ap.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(";") if m.strip()], default=None,
                    help="explicit method specs separated by ';' (replaces --policies x --budgets), e.g. "
                         "'full;int8;int4;h2o@0.25+int4'")
    ap.add_argument("--no-full", action="store_true", help="leave the full cache out (a partial run to be merged)")
    ap.add_argument("--contexts", type=_csv(int), default=[2048])
    ap.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9])
    ap.add_argument("--seeds", type=_csv(int), default=[0])
    ap.add_argument("--haystacks", type=_csv(str), default=["repetitive", "varied"])
    ap.add_argument("--keys", type=_csv(int), default=[1])
    ap.add_argument("--batch-size", type=int, default=6, help="passkey prompts per generate call")
    ap.add_argument("--ppl-prefix", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--eviction-cache", type=int, default=512)
    ap.add_argument("--speed-context", type=int, default=4096)
    ap.add_argument("--speed-methods", default="full,snapkv@0.25")
    ap.add_argument("--speed-batches", type=_csv(int), default=[1, 4])
    ap.add_argument("--speed-new-tokens", type=int, default=24)
    ap.add_argument("--no-table-speed", dest="table_speed", action="store_false",
                    help="do not time every method at the table context (the README table's decode column)")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--name", default="eval-smollm2")
    ap.add_argument("--note", action="append", default=[], help="a note stored in the JSON metadata")
    ap.add_argument("--estimate", action="store_true", help="print the plan and its estimated time, run nothing")
    ap.add_argument("--fresh", action="store_true", help="ignore a partial run instead of resuming it")
    ap.add_argument("--tasks", type=_csv(str), default=["passkey", "ppl", "fidelity", "speed"])
    ap.add_argument("--partial", default=None, help="checkpoint file (default <out>/<name>.partial.jsonl); two "
                    "runs with different --tasks and --keep-partial can be merged by concatenating theirs")
    ap.add_argument("--keep-partial", action="store_true", help="keep the checkpoint file after the run")
    return ap.parse_args(argv)


def grid_methods(policies, budgets, include_full: bool = True) -> list[str]:
    from pikv_jax.cache.policies import POLICIES
    from pikv_jax.eval.methods import method_grid

    if policies is None:
        policies = list(GRID_POLICIES) + [p for p in OPTIONAL_POLICIES if p in POLICIES]
    return method_grid(policies, budgets, include_full=include_full)


def ruler_cases_per_seed(cfg) -> int:
    """RULER cases per seed and context, as ruler.build_cases makes them."""
    from pikv_jax.eval.ruler import task_variants

    return sum(len(task_variants(t, cfg.ruler_value_types)) for t in cfg.ruler_tasks)


def plan_text(cfg, n_methods: int, total_s: float) -> str:
    """What the run covers, per task family, and its rough duration."""
    cases = []
    if "passkey" in cfg.tasks:
        cases.append(f"{len(cfg.depths) * len(cfg.seeds) * len(cfg.haystacks) * len(cfg.keys)} passkey")
    if "ruler" in cfg.tasks:
        cases.append(f"{len(cfg.seeds) * ruler_cases_per_seed(cfg)} RULER")
    per = " + ".join(cases) + " cases" if cases else "no generation cases"
    return (f"{n_methods} methods x {len(cfg.modes)} modes x {len(cfg.contexts)} context(s) x {per}; "
            f"estimated {total_s / 60:.0f} min on 2 idle cores")


def estimate_s(cfg) -> dict:
    """Rough seconds per task on 2 idle cores (compiles dominate small runs, prefill large ones)."""
    n_methods, w = len(cfg.methods), prefill_weight(cfg.methods)
    per_ctx = len(cfg.depths) * len(cfg.seeds) * len(cfg.haystacks) * len(cfg.keys)
    ruler_ctx = len(cfg.seeds) * ruler_cases_per_seed(cfg)
    passkey = ruler = 0.0
    for c in cfg.contexts:
        tok_s = PREFILL_TOK_S.get(c, 200.0)
        compiles = len(cfg.modes) + (len(cfg.keys) > 1)  # a multi-key question changes the suffix shape
        passkey += (n_methods * (compiles * COMPILE_S + len(cfg.modes) * per_ctx * 8 * DECODE_STEP_S)
                    + w * len(cfg.modes) * per_ctx * c / tok_s)
        ruler += len(cfg.modes) * (n_methods * (COMPILE_S + RULER_NEW_TOKENS * DECODE_STEP_S)
                                   + w * ruler_ctx * c / tok_s)
    ppl = ((n_methods + 1) * (COMPILE_S + cfg.ppl_tokens * DECODE_STEP_S)
           + (w + 1) * cfg.ppl_windows * cfg.ppl_prefix / 300.0)
    ev = 2 * (COMPILE_S + cfg.eviction_cache * (cfg.eviction_factor - 1) * DECODE_STEP_S)
    speed = sum(len(cfg.speed_methods) * (COMPILE_S + 6 * cfg.speed_new_tokens * DECODE_STEP_S * b)
                + prefill_weight(cfg.speed_methods) * b * cfg.speed_context / 170.0 for b in cfg.speed_batches)
    t = set(cfg.tasks)
    out = dict(passkey=passkey * ("passkey" in t), ruler=ruler * ("ruler" in t),
               perplexity_fidelity=ppl * bool(t & {"ppl", "fidelity"}),
               eviction=ev * ("ppl" in t), speed=speed * ("speed" in t), load=15.0)
    out["total"] = sum(out.values())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from pikv_jax.eval.runner import EvalConfig, run_eval

    methods = args.methods or grid_methods(args.policies, args.budgets, include_full=not args.no_full)
    notes = list(args.note)
    cfg = EvalConfig(model=args.model, methods=methods, tasks=args.tasks,
                     contexts=args.contexts, depths=args.depths, seeds=args.seeds, haystacks=args.haystacks,
                     keys=args.keys, batch_size=args.batch_size, ppl_prefix=args.ppl_prefix, ppl_tokens=args.ppl_tokens,
                     ppl_windows=args.ppl_windows, eviction_cache=args.eviction_cache,
                     eviction_methods=("streaming_llm@{cache}t", "streaming_llm(reindex_positions=True)@{cache}t"),
                     speed_context=args.speed_context, speed_methods=args.speed_methods.split(","),
                     speed_batches=args.speed_batches, speed_new_tokens=args.speed_new_tokens,
                     table_speed=args.table_speed, out=args.out, name=args.name, table_context=max(args.contexts),
                     notes=notes, resume=not args.fresh,
                     keep_going=True, partial=args.partial, keep_partial=args.keep_partial)
    cfg.validate()
    est = estimate_s(cfg)
    plan = plan_text(cfg, len(methods), est["total"])
    print(f"[eval_grid] {plan}\n[eval_grid] methods: {', '.join(methods)}", file=sys.stderr)
    if args.estimate:
        for k, v in est.items():
            print(f"  {k:22s} {v / 60:6.1f} min", file=sys.stderr)
        return 0
    cfg.notes = list(cfg.notes) + [f"plan: {plan}"]
    if args.fresh:
        import os

        partial = cfg.partial or os.path.join(cfg.out, cfg.name + ".partial.jsonl")
        if os.path.exists(partial):
            os.remove(partial)
    t0 = time.perf_counter()
    payload = run_eval(cfg)
    print(f"[eval_grid] done in {(time.perf_counter() - t0) / 60:.1f} min: {payload['meta']['files']}", file=sys.stderr)
    print(payload["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
