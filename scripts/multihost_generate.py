#!/usr/bin/env python
"""Sharded `PiKVModel.generate` run by every process of a multi-process JAX job (one mesh over the
devices of all processes, each process holding only its shards). Started by

    python scripts/launch_multihost.py --processes 2 --devices-per-process 4 generate \\
        --mesh data=2,model=4 --method full --method "h2o@0.5"

Every process calls `pikv_jax.parallel.initialize()` (coordinator and rank from the launcher's
PIKV_* environment), builds the same tiny random Llama-shaped model (8 KV heads, the configuration
and ragged prompts of tests/sharded_generate_checks.py) from the same seed, places it on the global
mesh and generates greedily per method. Process 0 prints one JSON line (and writes it to --out):
per method the token ids, finish reasons and `cache_bytes_per_device` (measured from this process's
shards). With one process and `--mesh none` it is the single-device reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

KIVI = "int4(group_size=8,residual_length=16)"
DEFAULT_METHODS = ["full", "h2o@0.5", KIVI]
LENGTHS = [64, 50, 57, 41]  # a ragged batch of 4 rows: 2 per data shard on data=2
MAX_NEW = 10
CONTEXT = 64


def config(kv_heads: int = 8):
    from pikv_jax.config import tiny_config

    return tiny_config(num_attention_heads=8, num_key_value_heads=kv_heads, hidden_size=128, intermediate_size=96,
                       vocab_size=128, num_hidden_layers=2, max_position_embeddings=512)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 128, n).tolist() for n in LENGTHS]


def generate_all(model, methods) -> dict:
    """{method: {token_ids, finish_reasons, cache_bytes, cache_bytes_per_device, seconds}}."""
    from pikv_jax.eval.methods import parse_method

    out = {}
    for spec in methods:
        t0 = time.perf_counter()
        policy = parse_method(spec, model=model, context_len=CONTEXT).policy
        res = model.generate(prompts(), MAX_NEW, policy=policy)
        stats = res.stats
        out[spec] = dict(token_ids=res.token_ids, finish_reasons=res.finish_reasons, cache_bytes=stats["cache_bytes"],
                         cache_bytes_per_device=stats["cache_bytes_per_device"], kept_tokens=stats["kept_tokens"],
                         seen_tokens=stats["seen_tokens"], seconds=round(time.perf_counter() - t0, 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", default="data=2,model=4", help="mesh spec over all processes' devices, or 'none'")
    p.add_argument("--method", action="append", default=None, help=f"cache method (repeatable; default: "
                                                                    f"{', '.join(DEFAULT_METHODS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file that process 0 writes")
    args = p.parse_args(argv)

    from pikv_jax.parallel import initialize

    pid, nproc = initialize()  # before anything touches the devices

    import jax

    from pikv_jax.api import PiKVModel
    from pikv_jax.parallel import mesh_from_spec

    mesh = None if args.mesh == "none" else mesh_from_spec(args.mesh)
    t0 = time.perf_counter()
    model = PiKVModel.from_config(config(), seed=args.seed, mesh=mesh)
    result = dict(process_id=pid, num_processes=nproc, num_devices=jax.device_count(),
                  local_devices=jax.local_device_count(), mesh=None if mesh is None else
                  {str(k): int(v) for k, v in dict(mesh.shape).items()},
                  methods=generate_all(model, args.method or DEFAULT_METHODS))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if pid == 0:
        text = json.dumps(result)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
