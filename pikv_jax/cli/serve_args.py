"""`pikv serve`: the OpenAI-compatible HTTP server (serve/http.py) over the serving engine.

    pikv serve --model smollm2 --method h2o@0.25+int4 --cache-memory 2GiB --port 8000

It listens on 127.0.0.1 only: the server has no authentication, so another host is refused
(put an authenticating proxy in front to expose it). The port is bound before the model loads, so
a busy port fails at once. One line on stdout gives the URL, the slots and the bytes per slot;
progress lines go to stderr. Ctrl-C finishes the requests in flight (or cancels them with
--cancel-on-shutdown) and exits.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

LOCAL_HOST = "127.0.0.1"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="bundled name (smollm2), a .gguf file, a Hugging Face folder, or random:<preset>")
    p.add_argument("--model-name", default=None, help="the name responses report (default: --model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    p.add_argument("--cache-dtype", default=None, choices=["float32", "bfloat16"],
                   help="KV cache dtype (default: the model dtype)")
    p.add_argument("--method", default="full",
                   help="cache method spec as in `pikv eval --methods`: full, h2o@0.25, int4, h2o@0.25+int4, ...")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cache-memory", default=None, metavar="SIZE",
                      help="memory for the pool of cache slots, e.g. 512MiB or 2GiB (default 2GiB); as many "
                           "slots as fit")
    size.add_argument("--slots", type=int, default=None, help="number of cache slots (requests decoded at once)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (sizes each slot)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens accepted (sizes each slot)")
    p.add_argument("--steps-per-visit", type=int, default=8, help="decode steps between host visits")
    p.add_argument("--host", default=LOCAL_HOST, help="127.0.0.1 only (the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--warmup", action="store_true", help="compile every prompt bucket before serving")
    p.add_argument("--cancel-on-shutdown", action="store_true",
                   help="on Ctrl-C cancel the requests in flight instead of finishing them")
    p.add_argument("--progress", type=float, default=10.0, metavar="SECONDS",
                   help="print a progress line to stderr this often while requests arrive (0 = never)")


def check_serve_args(args) -> None:
    """The flags that need no model, checked before the (slow) model load."""
    if args.host != LOCAL_HOST:
        raise ValueError(f"--host {args.host} is refused: the server has no authentication, so it listens on "
                         f"{LOCAL_HOST} only")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("slots", "max_prompt_tokens", "max_new_tokens", "steps_per_visit", "max_body_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.progress < 0:
        raise ValueError(f"--progress must be >= 0 seconds, got {args.progress}")


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _report_progress(engine, every: float, stop: threading.Event) -> None:
    """engine.metrics.progress_line on stderr every `every` seconds while the counts change."""
    counts = lambda m: (m.requests_submitted, m.requests_finished, engine.busy_slots)
    last = counts(engine.metrics)
    while not stop.wait(every):
        m = engine.metrics
        now = counts(m)
        if now != last:
            print("[pikv] " + m.progress_line(busy=engine.busy_slots, queued=engine.queue_length),
                  file=sys.stderr, flush=True)
            last = now


def cmd_serve(args) -> int:
    import uvicorn

    from pikv_jax.api import PiKVModel
    from pikv_jax.eval.methods import parse_method
    from pikv_jax.serve.engine import Engine, parse_bytes, warmup
    from pikv_jax.serve.http import make_app

    check_serve_args(args)
    if args.cache_memory is not None:
        parse_bytes(args.cache_memory)
    sock = _listen(args.host, args.port)
    print(f"[pikv] loading {args.model}", file=sys.stderr, flush=True)
    model = PiKVModel.from_pretrained(args.model, dtype=args.dtype, cache_dtype=args.cache_dtype)
    policy = parse_method(args.method, model=model, context_len=args.max_prompt_tokens).policy
    engine = Engine(model, policy, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    num_slots=args.slots, cache_memory=None if args.slots else (args.cache_memory or "2GiB"),
                    steps_per_visit=args.steps_per_visit)
    if args.warmup:
        print(f"[pikv] warmup: compiled in {warmup(engine):.1f} s", file=sys.stderr, flush=True)
    name = args.model_name or args.model
    app = make_app(engine, model_name=name, max_body_bytes=args.max_body_bytes,
                   cancel_on_shutdown=args.cancel_on_shutdown)
    port = sock.getsockname()[1]
    print(f"[pikv] serving {name} ({engine.policy.label}) at http://{LOCAL_HOST}:{port}/v1 | {engine.num_slots} "
          f"slots x {engine.slot_bytes:,} bytes per slot ({engine.cache_bytes_allocated / 2**20:.1f} MiB)", flush=True)
    stop = threading.Event()
    if args.progress:
        threading.Thread(target=_report_progress, args=(engine, args.progress, stop), daemon=True).start()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=0.5 if args.cancel_on_shutdown
                            else None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once the app has shut down
        pass
    finally:
        stop.set()
    print("[pikv] " + engine.metrics.progress_line(busy=engine.busy_slots, queued=engine.queue_length) + " | stopped",
          file=sys.stderr, flush=True)
    return 0
