"""`pikv eval`: flags and command. Wire into the main parser with

    e = sub.add_parser("eval", help="passkey, perplexity and logit fidelity under cache policies")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
"""

from __future__ import annotations

import argparse
import json
import sys

from pikv_jax.eval.methods import _split_top, check_methods
from pikv_jax.eval.runner import EvalConfig, run_eval, smoke_config


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    out = []
    for x in text.replace(" ", "").split(","):
        if not x:
            continue
        try:
            out.append(float(x[:-1]) / 100 if x.endswith("%") else float(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return out


def _words(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="bundled name (smollm2), a .gguf file, a Hugging Face folder, or random:<preset>")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None,
                   help="device mesh for sharded generation, e.g. data=2,model=4 (axes: data, model)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method specs: full, h2o@0.25, snapkv@50%%, snapkv+h2o@0.25, "
                        "streaming_llm@256t, h2o(recent_ratio=0.3)@0.25 (default: full + streaming_llm, h2o, "
                        "snapkv at 50%% and 25%%)")
    p.add_argument("--tasks", type=_words, default=None, help="comma-separated: passkey,ruler,ppl,fidelity,speed")
    p.add_argument("--contexts", type=_ints, default=None, help="passkey context lengths in tokens (1024,2048,4096)")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths in [0, 1] or percent (0,25%%,50%%)")
    p.add_argument("--seeds", type=_ints, default=None, help="seeds (keys and haystack offsets)")
    p.add_argument("--haystack", type=_words, default=None,
                   help="repetitive, varied, or a text file path; comma-separated for several")
    p.add_argument("--keys", type=_ints, default=None, help="numbers of hidden keys per case (1 = single, 3 = multi)")
    p.add_argument("--modes", type=_words, default=None, help="query_aware,query_agnostic")
    p.add_argument("--ruler-tasks", type=_words, default=None,
                   help="RULER-style tasks for --tasks ruler (default all): niah_single, niah_multikey, "
                        "niah_multivalue, niah_multiquery, variable_tracking, common_words, frequent_words; "
                        "lengths from --contexts, seeds from --seeds")
    p.add_argument("--ruler-value-types", type=_words, default=None,
                   help="needle value types of niah_single, one case each: word,number,uuid (default all)")
    p.add_argument("--ruler-max-new-tokens", type=int, default=None, help="answer tokens generated per RULER case")
    p.add_argument("--batch-size", type=int, default=None, help="passkey / RULER prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens generated per passkey case")
    p.add_argument("--ppl-prefix", type=int, default=None, help="compressed prefix tokens for perplexity / KL")
    p.add_argument("--ppl-tokens", type=int, default=None, help="teacher-forced tokens scored after the prefix")
    p.add_argument("--ppl-windows", type=int, default=None, help="(prefix, continuation) windows of held-out text")
    p.add_argument("--eviction-cache", type=int, default=None,
                   help="cache tokens for decode-time eviction perplexity (text is 4x longer)")
    p.add_argument("--speed-context", type=int, default=None, help="prompt tokens for the decode-speed task")
    p.add_argument("--speed-methods", default=None, help="methods for the decode-speed task")
    p.add_argument("--speed-batches", type=_ints, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run for CI (~3 min on 2 cores): 512-token contexts, 2 depths, 1 seed, "
                        "full / snapkv@0.5, short perplexity and fidelity")
    p.add_argument("--out", default="eval-out", help="output folder for <name>.json / .png / .md")
    p.add_argument("--name", default=None, help="file name stem (default eval, or eval-smoke with --smoke)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished units in <out>/<name>.partial.jsonl and skip them when the run is repeated")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the goals and output paths as JSON on stdout")


_FIELDS = {"model": "model", "dtype": "dtype", "tasks": "tasks", "contexts": "contexts", "depths": "depths",
           "seeds": "seeds", "haystack": "haystacks", "keys": "keys", "modes": "modes", "batch_size": "batch_size",
           "max_new_tokens": "max_new_tokens", "ruler_tasks": "ruler_tasks",
           "ruler_value_types": "ruler_value_types", "ruler_max_new_tokens": "ruler_max_new_tokens",
           "ppl_prefix": "ppl_prefix", "ppl_tokens": "ppl_tokens",
           "ppl_windows": "ppl_windows", "eviction_cache": "eviction_cache", "speed_context": "speed_context",
           "speed_batches": "speed_batches", "out": "out", "name": "name",
           "mesh": "mesh"}


def config_from_args(args):
    over = {}
    for flag, field in _FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = v
    if args.methods:
        over["methods"] = _split_top(args.methods)
    if args.speed_methods:
        over["speed_methods"] = _split_top(args.speed_methods)
    over["progress"] = not args.no_progress
    over["resume"] = bool(getattr(args, "resume", False))
    cfg = smoke_config(**over) if args.smoke else EvalConfig(**over)
    cfg.validate()
    return cfg


def cmd_eval(args) -> int:
    cfg = config_from_args(args)
    check_methods(list(cfg.methods) + list(cfg.speed_methods))  # fail fast on a bad spec, before loading the model
    print(f"[pikv] eval {cfg.model}: tasks {','.join(cfg.tasks)}; methods {', '.join(cfg.methods)}", file=sys.stderr,
          flush=True)
    payload = run_eval(cfg)
    meta = payload["meta"]
    print(f"[pikv] wrote {', '.join(meta['files'].values())} in {meta['timings']['total_s']:.0f}s", file=sys.stderr)
    if args.json:
        print(json.dumps({"files": meta["files"], "goals": payload["goals"], "timings": meta["timings"]}))
    else:
        print(payload["table_markdown"])
    return 0


__all__ = ["add_eval_args", "cmd_eval", "config_from_args"]
