#!/usr/bin/env python
"""Benchmark of the sparse MoE layer: capacity dispatch vs dropless (ragged_dot) vs the dense
every-expert reference on one device, and the expert-parallel all_to_all path on N simulated CPU
devices vs the same math on one device. Every number of a ratio is measured side by side in this run.

    python scripts/bench_moe.py --out benchmarks/moe-cpu.json
    python scripts/bench_moe.py --quick --out /tmp/moe.json     # small shapes, whole path, seconds

Protocol (pikv_jax.bench): every path is compiled, then a warm-up round and `--repeats` interleaved
rounds over all five paths (round r times each path once, in turn); median and min-max per path,
ratios of tokens/s from the medians with their range from the per-round ratios. The simulated
devices share the machine's cores, so the all_to_all ratio measures the overhead of expert
parallelism (dispatch, two all_to_alls, per-device programs), not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the experts (0 = plain experts)")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices for the all_to_all path")
    p.add_argument("--data", type=int, default=2, help="data axis size of the mesh (expert axis = devices / data)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (after one warm-up round)")
    p.add_argument("--quick", action="store_true", help="512 tokens, hidden 64, intermediate 128, 5 rounds")
    p.add_argument("--out", default="benchmarks/moe-cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.intermediate, args.repeats = 512, 64, 128, 5
    return args


def _set_devices(n: int):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


if "jax" not in sys.modules:  # the device count must be set before jax is imported
    _set_devices(parse_args(sys.argv[1:] if __name__ == "__main__" else []).devices)

import jax  # noqa: E402 - after the device count
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pikv_jax.bench import fmt_spread, interleaved_rounds, machine_info, protocol, ratio_spread, write_json  # noqa: E402
from pikv_jax.moe import PiKVMoE  # noqa: E402
from pikv_jax.moe.distributed import DistributedPiKVMoE, place_on_mesh, token_sharding  # noqa: E402
from pikv_jax.parallel import expert_mesh  # noqa: E402

# (first, second, key): tokens/s of `first` over tokens/s of `second`
RATIOS = (("dropless_ragged_dot", "capacity", "dropless_over_capacity_tokens_per_s"),
          ("capacity", "dense_every_expert", "capacity_over_dense_tokens_per_s"),
          ("all_to_all_mesh", "single_device_grouped", "all_to_all_over_single_device_tokens_per_s"))


def compiled(module, x, *, reference=False):
    """(call, compile seconds, stats of the first output): call() runs the jitted forward."""
    graphdef, state = nnx.split(module)
    if reference:
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).dense_reference(x))
    else:
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(state, x))
    compile_s = time.perf_counter() - t0
    extra = {}
    if not reference:
        stats = out[1].stats
        extra = dict(drop_rate=float(jax.device_get(stats["drop_rate"])),
                     capacity=int(jax.device_get(stats["capacity"])))
    return (lambda: fn(state, x)), compile_s, extra


def main(argv=None) -> int:
    args = parse_args(argv)
    if jax.device_count() < args.devices:
        raise RuntimeError(f"{jax.device_count()} devices, --devices {args.devices}: the device count is set when "
                           "this module is imported, before jax (run it as a script)")
    h, e, k, t = args.hidden, args.experts, args.top_k, args.tokens
    mesh = expert_mesh(args.data, args.devices // args.data)
    n_dev = args.devices
    x = jax.random.normal(jax.random.key(0), (t, h), jnp.float32)

    def build(cls=PiKVMoE, **kw):
        kw = dict(dict(rank=args.rank, alpha=2.0 * max(args.rank, 1), intermediate_size=args.intermediate,
                       capacity_factor=args.capacity_factor, rngs=nnx.Rngs(0)), **kw)
        return cls(h, e, k, **kw)

    single = build()
    dist = build(DistributedPiKVMoE, mesh=mesh)
    place_on_mesh(dist)
    paths = {"capacity": compiled(single, x),
             "dropless_ragged_dot": compiled(build(dropless=True), x),
             "dense_every_expert": compiled(single, x, reference=True),
             "single_device_grouped": compiled(build(num_groups=n_dev), x),
             "all_to_all_mesh": compiled(dist, jax.device_put(x, token_sharding(dist)))}
    res = interleaved_rounds({name: call for name, (call, _, _) in paths.items()}, rounds=args.repeats,
                             on_round=lambda r, v: print(f"  round {r}: " + " | ".join(
                                 f"{n} {1000 * s:.1f}" for n, s in v.items()) + " ms", flush=True))
    results = {}
    for name, (_, compile_s, extra) in paths.items():
        s = res.stats(name)
        results[name] = dict(median_ms=1000 * s["median"], min_ms=1000 * s["min"], max_ms=1000 * s["max"],
                             rounds_ms=[1000 * v for v in s["rounds"]],
                             warmup_ms=[1000 * v for v in res.warmup[name]],
                             tokens_per_s=t / s["median"], tokens_per_s_range=[t / s["max"], t / s["min"]],
                             compile_s=compile_s, **extra)
    # tokens/s ratio first/second = time(second) / time(first), per round
    ratios = {key: ratio_spread(res.values[b], res.values[a]) for a, b, key in RATIOS}
    report = {
        "benchmark": "moe-layer-cpu",
        "command": "python scripts/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": dict(machine_info(), simulated_devices=jax.device_count(),
                        load_average_1m_at_end=os.getloadavg()[0]),
        "config": {"tokens": t, "hidden": h, "intermediate": args.intermediate, "experts": e, "top_k": k,
                   "lora_rank": args.rank, "capacity_factor": args.capacity_factor, "dtype": "float32",
                   "mesh": dict(mesh.shape), "repeats": args.repeats, "quick": args.quick},
        "protocol": protocol(args.repeats, 1),
        "order": [f"{r}:{n}" for r, n in res.order],
        "results": results,
        "ratios": {key: r["median"] for key, r in ratios.items()},
        "ratio_ranges": ratios,
        "notes": ("single_device_grouped runs the same math as all_to_all_mesh (one capacity group per device) on "
                  "one device; the simulated devices share the same CPU cores, so that ratio is the overhead of "
                  "expert parallelism on CPU, not a speed-up. Ratios > 1 mean the first path is faster; each is "
                  "the ratio of median tokens/s, its range from the per-round ratios of the interleaved rounds. "
                  "Dropless ragged_dot is measured slower than even the dense every-expert reference on CPU "
                  "(no grouped-matmul kernel there); it is the path for GPU/TPU."),
    }
    write_json(args.out, report)
    for key, r in ratios.items():
        print(f"{key:45s} {fmt_spread(r, '.2f')}x")
    for name, r in results.items():
        print(f"{name:24s} {r['tokens_per_s']:>12.0f} tokens/s  ({fmt_spread(res.stats(name), '.4f')} s, "
              f"drop rate {r.get('drop_rate', 0.0):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
