"""The README policy table from finished eval runs: one table per context, every method's passkey
accuracy and RULER-style mean in both modes, perplexity / KL / top-1, kept and allocated bytes and
decode ms/token measured side by side (ratio of medians with its per-round range).

Runs are eval JSON files (`scripts/eval_grid.py` or `pikv eval` outputs); a measurement present in
two of them is an error, except decode speed under --speed-from (a run that timed every row again,
side by side, replaces earlier groups at its context and batch) and passkey / RULER rows whose runs hold
different cases (another haystack or seed: the row is summarized over the union of their records).
Writes the markdown to --out and prints it.

    python scripts/policy_table.py benchmarks/policies-2k.json benchmarks/ruler-2k.json \\
        --contexts 2048 --out benchmarks/policy-table.md
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="eval JSON files")
    ap.add_argument("--contexts", default=None,
                    help="comma-separated contexts, one table each (default: every passkey context in the runs)")
    ap.add_argument("--out", default=None, help="markdown file to write")
    ap.add_argument("--speed-from", default=None,
                    help="one of the runs: its decode-speed groups replace the other runs' at the same context and "
                         "batch (a later side-by-side timing of every row)")
    args = ap.parse_args(argv)
    if args.speed_from is not None and args.speed_from not in args.runs:
        print(f"policy_table: --speed-from: one of the runs given, got {args.speed_from!r}", file=sys.stderr)
        return 2
    from pikv_jax.eval import report

    payloads = []
    for path in args.runs:
        try:
            with open(path) as f:
                payloads.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"policy_table: runs: cannot read {path!r} as eval JSON ({e})", file=sys.stderr)
            return 2
    try:
        merged = report.merge_runs(payloads, speed_from=args.runs.index(args.speed_from)
                                   if args.speed_from is not None else None)
    except ValueError as e:
        print(f"policy_table: runs: {e}", file=sys.stderr)
        return 2
    present = sorted({r["context"] for r in merged["passkey"]} | {r["context"] for r in merged["ruler"]})
    try:
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else present
    except ValueError:
        print(f"policy_table: --contexts: integers separated by commas, got {args.contexts!r}", file=sys.stderr)
        return 2
    missing = [c for c in contexts if c not in present]
    if missing:
        print(f"policy_table: --contexts: no passkey or RULER rows at {missing} in the runs (they hold {present})",
              file=sys.stderr)
        return 2
    md = report.policy_tables(merged, contexts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
