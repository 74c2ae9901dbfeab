"""The `pikv` command: `generate` and `info` (later issues add `eval`, `bench`, `distill`).

Each subcommand registers its flags in its own `add_*_args` function so that cache policies and
compressors can contribute flags to `generate` without touching the others. Progress goes to
stderr; with `--json` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import sys
import time

import jax

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies import Composite, make_policy
from pikv_jax.cli.bench_serve_args import add_bench_serve_args, cmd_bench_serve
from pikv_jax.cli.compress_args import add_compress_args, apply_compress, validate_compress_args
from pikv_jax.cli.moe_args import add_moe_args, apply_moe_args
from pikv_jax.cli.serve_args import add_serve_args, cmd_serve
from pikv_jax.eval.cli import add_eval_args, cmd_eval
from pikv_jax.models.registry import bundled_model_path
from pikv_jax.parallel import mesh_from_spec
from pikv_jax.train.cli import add_distill_args, cmd_distill


def _progress(stage: str):
    """A progress printer for long steps (loading tensors): a live line on a terminal, else one line."""
    state = {"t0": time.perf_counter(), "last": -1}
    tty = sys.stderr.isatty()

    def report(done: int, total: int):
        pct = int(100 * done / max(total, 1))
        if done == total:
            print(f"\r[pikv] {stage}: 100% ({total}/{total}) in {time.perf_counter() - state['t0']:.1f}s",
                  file=sys.stderr, flush=True)
        elif tty and pct != state["last"]:
            state["last"] = pct
            print(f"\r[pikv] {stage}: {pct:3d}% ({done}/{total})", end="", file=sys.stderr, flush=True)

    return report


def _say(msg: str):
    print(f"[pikv] {msg}", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2",
                   help="bundled name (smollm2), a .gguf file, a Hugging Face folder, or random:<preset>")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    p.add_argument("--cache-dtype", default=None, choices=["float32", "bfloat16"],
                   help="KV cache dtype (default: the model dtype)")
    p.add_argument("--mesh", default=None,
                   help="device mesh for sharded generation, e.g. data=2,model=4 (axes: data, model)")


def add_generate_args(p: argparse.ArgumentParser):
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cache-tokens", type=int, default=None, help="cap on cache slots per layer")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (batch of 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    add_policy_args(p)

    add_compress_args(p)
    add_moe_args(p)


def add_policy_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("cache policy")
    g.add_argument("--policy", default="full", help="cache policy: full, streaming_llm, h2o, lru, tova, knorm, "
                   "keydiff, snapkv, pyramidkv, adakv, quest, duo_attention")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget", type=float, default=None, help="kept fraction of the prompt, in (0, 1]")
    b.add_argument("--budget-tokens", type=int, default=None, help="kept prompt tokens per row (and cache size "
                   "under decode-time eviction)")
    g.add_argument("--decode-policy", default=None,
                   help="a second policy that evicts at decode time after --policy selected at prefill "
                        "(e.g. --policy snapkv --decode-policy h2o)")
    g.add_argument("--n-sink", type=int, default=None, help="sink tokens never evicted (default 4)")
    g.add_argument("--window", type=int, default=None, help="recent tokens never evicted")
    g.add_argument("--evict-every", type=int, default=None, help="evict N tokens at once every N steps")
    g.add_argument("--decode-evict", dest="decode_evict", action="store_true", default=None,
                   help="evict at decode time so the cache stays at the budget")
    g.add_argument("--no-decode-evict", dest="decode_evict", action="store_false",
                   help="keep the prefill selection and append decoded tokens")
    g.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the policy (repeatable), e.g. obs_window=32 or recent_ratio=0.3")


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_policy(args, num_layers: int):
    """The cache policy named by the flags (Full unless a policy flag says otherwise)."""
    options = {}
    for item in args.policy_option:
        if "=" not in item:
            raise ValueError(f"--policy-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    for flag in ("n_sink", "window", "evict_every", "decode_evict"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag)
    budget = {}
    if args.budget is not None:
        if not 0.0 < args.budget <= 1.0:
            raise ValueError(f"--budget must be in (0, 1], got {args.budget}")
        budget["budget_ratio"] = args.budget
    if args.budget_tokens is not None:
        if args.budget_tokens < 1:
            raise ValueError(f"--budget-tokens must be >= 1, got {args.budget_tokens}")
        budget["budget_tokens"] = args.budget_tokens
    if args.policy in ("full", "none") and (budget or options):
        raise ValueError("--budget/--budget-tokens and policy options need a --policy other than full")
    if args.decode_policy is None:
        return make_policy(args.policy, num_layers=num_layers, **budget, **options)
    prefill = make_policy(args.policy, num_layers=num_layers, **budget)
    decode = make_policy(args.decode_policy, num_layers=num_layers, **options)
    return Composite(prefill_policy=prefill, decode_policy=decode)


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.max_cache_tokens is not None and args.max_cache_tokens < 1:
        raise ValueError(f"--max-cache-tokens must be >= 1, got {args.max_cache_tokens}")
    build_policy(args, num_layers=1)  # validate the flags before the (slow) model load

    validate_compress_args(args)
    mesh = mesh_from_spec(args.mesh) if args.mesh else None  # validated before the slow load
    _say(f"loading {args.model}")
    model = PiKVModel.from_pretrained(args.model, dtype=args.dtype, cache_dtype=args.cache_dtype,
                                      progress=_progress("loading tensors"), mesh=mesh)

    model = apply_moe_args(args, model)
    policy = apply_compress(args, build_policy(args, model.config.num_hidden_layers), model)
    callback = None
    if args.stream:
        if len(args.prompt) != 1:
            raise ValueError("--stream supports a single --prompt")
        callback = _streamer(model)
    _say("compiling and generating")
    out = model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system, policy=policy,
                         max_cache_tokens=args.max_cache_tokens, callback=callback)
    if args.stream:
        print(flush=True)
    if args.json:
        result = {"text": out.texts[0] if len(out.texts) == 1 else out.texts,
                  "token_ids": out.token_ids[0] if len(out.token_ids) == 1 else out.token_ids,
                  "finish_reason": out.finish_reasons[0] if len(out.texts) == 1 else out.finish_reasons,
                  "prompt_tokens": out.prompt_lengths, "stats": out.stats}
        print(json.dumps(result))
    elif not args.stream:
        for text in out.texts:
            print(text)
    if not args.json:
        s = out.stats
        print(f"[pikv] prefill {s['prefill_tokens_per_s']:.1f} tok/s | "
              f"decode {s['decode_ms_per_token']:.1f} ms/token | "
              f"cache {s['cache_bytes'] / 2**20:.2f} MiB allocated vs "
              f"{s['full_cache_bytes'] / 2**20:.2f} MiB full bf16 | "
              f"fill {100 * s['cache_fill']:.0f}% | compile {s['compile_s']:.1f}s", file=sys.stderr)
    return 0


def _streamer(model):
    """Host callback printing newly decoded text; decodes the whole prefix so multi-byte tokens stay whole."""
    ids: list[int] = []
    printed = [""]

    def cb(step, tokens, emitted):
        if bool(emitted[0]):
            ids.append(int(tokens[0]))
            text = model.tokenizer.decode(ids)
            if not text.endswith("\ufffd"):
                print(text[len(printed[0]):], end="", flush=True)
                printed[0] = text

    return cb


def cmd_info(args) -> int:


    versions = {}
    for pkg in ("pikv-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        bundled = bundled_model_path("smollm2")
    except FileNotFoundError as e:
        bundled = f"not installed ({e})"
    info = {"python": sys.version.split()[0], "versions": versions, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "bundled_model": {"smollm2": bundled}}
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pikv", description="KV-cache management for JAX LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with a cache policy / compression")
    add_generate_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="passkey retrieval, perplexity and logit fidelity under cache methods")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("distill", help="distillation training (LoRA compressor, DuoAttention gates, MoE student)")
    add_distill_args(d)
    d.set_defaults(func=cmd_distill)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching on 127.0.0.1")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench-serve", help="replay a seeded serving workload against the engine or a server")
    add_bench_serve_args(b)
    b.set_defaults(func=cmd_bench_serve)
    i = sub.add_parser("info", help="versions, devices and the bundled model's path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pikv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
