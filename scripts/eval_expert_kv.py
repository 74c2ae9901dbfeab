"""Expert-sharded KV storage on SmolLM2 at 2k context: passkey accuracy, perplexity and KV bytes read
per decode step for the full cache, expert_kv exact (all shards) and routed top-1 / top-2 of 4.

    .venv/bin/python scripts/eval_expert_kv.py [--context 2048] [--modes query_agnostic,query_aware]
        [--out benchmarks/expert-kv-smollm2.json] [--stages passkey,perplexity] [--resume]

Passkey: the shipped varied haystack, depths 0.1 / 0.5 / 0.9, seed 0, one batch per method and mode.
Perplexity: teacher-forced NLL of `--cont` held-out tokens after a `--context`-token prefix (one
window), against the full cache. Bytes: `kv_bytes_read_per_step` from the generation stats (K and V
slots one decode step reads, all layers and rows) against `kv_bytes_read_per_step_full` (K and V of
every token seen, what a full cache reads). The JSON is rewritten after every method, so an
interrupted run keeps what it finished; `--resume` reads it back and skips the (method, passkey mode)
pairs and perplexity rows already there. Local GGUF only, no downloads.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.eval import passkey, perplexity
from pikv_jax.eval.methods import parse_method

METHODS = ("full", "expert_kv(shards=4,top_k=1)", "expert_kv(shards=4)", "expert_kv(shards=4,top_k=2)")
EXPERT_KEYS = ("shard_tokens", "shard_load_max_over_mean", "shard_load_max_over_mean_per_head", "spilled_tokens",
               "evicted_tokens", "kv_bytes_read_per_step", "kv_bytes_read_per_step_all_shards",
               "kv_bytes_read_per_step_full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--modes", default="query_agnostic,query_aware")
    ap.add_argument("--cont", type=int, default=128, help="teacher-forced tokens after the prefix (perplexity)")
    ap.add_argument("--methods", default=";".join(METHODS), help="method specs separated by ';'")
    ap.add_argument("--out", default="benchmarks/expert-kv-smollm2.json")
    ap.add_argument("--stages", default="passkey,perplexity", help="which of passkey, perplexity to run, in order")
    ap.add_argument("--resume", action="store_true", help="keep the results already in --out and skip them")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - {"passkey", "perplexity"}:
        raise SystemExit(f"--stages must name passkey and/or perplexity, got {args.stages!r}")

    t0 = time.perf_counter()
    model = PiKVModel.from_pretrained("smollm2")
    codec = passkey.codec_for(model)
    depths = [float(d) for d in args.depths.split(",")]
    cases = passkey.build_cases(codec, contexts=[args.context], depths=depths, seeds=[0], haystacks=["varied"])
    ids = perplexity.heldout_ids(model, codec=codec)
    methods = [parse_method(s, model=model, context_len=args.context) for s in args.methods.split(";")]
    modes = [m for m in args.modes.split(",") if m]
    out_path = pathlib.Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = dict(model="smollm2", context=args.context, depths=depths, seed=0, haystack="varied", modes=[],
                  cont_tokens=args.cont, device="cpu (2 cores, shared)", methods={})
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        if (old.get("context"), old.get("depths")) != (args.context, depths):
            raise SystemExit(f"--resume: {out_path} was run at another context or depths")
        result.update(old, cont_tokens=args.cont)
    elapsed0 = float(result.get("elapsed_s", 0.0))

    def save():
        result["elapsed_s"] = round(elapsed0 + time.perf_counter() - t0, 1)
        out_path.write_text(json.dumps(result, indent=1, default=float) + "\n")

    for stage in stages:
        if stage == "passkey":
            run_passkey_stage(model, methods, cases, modes, codec, result, save)
        else:
            run_perplexity_stage(model, methods, ids, args, result, save)


def run_passkey_stage(model, methods, cases, modes, codec, result, save) -> None:
    result["modes"] = list(dict.fromkeys(result["modes"] + modes))
    for m in methods:
        row: dict = result["methods"].setdefault(m.label, {})
        todo = [mode for mode in modes if f"passkey_{mode}" not in row]
        if not todo:
            continue
        gen_stats: list[dict] = []
        records = passkey.run_passkey(model, [m], cases, modes=todo, batch_size=len(cases), codec=codec,
                                      progress=lambda _: gen_stats.append(model.get_stats()))
        for mode in todo:
            rs = [r for r in records if r["mode"] == mode]
            row[f"passkey_{mode}"] = sum(r["correct"] for r in rs) / len(rs)
            row[f"passkey_{mode}_cases"] = [dict(depth=r["depth"], correct=bool(r["correct"]), output=r["output"])
                                           for r in rs]
        st = gen_stats[-1]
        row.update({k: st[k] for k in EXPERT_KEYS if k in st})
        if "kv_bytes_read_per_step" not in st:  # the full cache reads K and V of every slot it holds
            cfg = model.config
            row["kv_bytes_read_per_step"] = int(st["cache_capacity_tokens"] * st["batch"] * cfg.num_hidden_layers
                                                * cfg.num_key_value_heads * cfg.dim_per_head * 2
                                                * np.dtype(model.cache_dtype).itemsize)
        save()
        print(m.label, {k: row[k] for k in row if k.startswith("passkey_") and not k.endswith("cases")},
              row.get("kv_bytes_read_per_step"), flush=True)


def run_perplexity_stage(model, methods, ids, args, result, save) -> None:
    """One full-cache reference pass for every method; rows already in the JSON are kept."""
    cached = {label: dict(row, method=label) for label, row in result["methods"].items()
              if "ppl_change" in row and row.get("cont_len") == args.cont}

    def on_row(ppl):
        result["methods"].setdefault(ppl["method"], {}).update({k: v for k, v in ppl.items() if k != "method"})
        save()
        print(ppl, flush=True)

    perplexity.prefix_perplexity(model, methods, ids, prefix_len=args.context, cont_len=args.cont, n_windows=1,
                                 with_fidelity=True, cached=cached, on_row=on_row)


if __name__ == "__main__":
    main()
