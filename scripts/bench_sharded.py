#!/usr/bin/env python
"""Sharded decode on CPU: 1 device against 8 simulated devices (data=8; data=2,model=4; data=2,seq=4).

On a random Llama-shaped model (4 layers, hidden 512, 8 heads, 8 KV heads, head_dim 64) with a
full cache, batch 8, a 1k-token random prompt per row and 32 new tokens (stop tokens off), per
configuration:
- decode ms/token by the protocol of pikv_jax.bench: one warm-up round, then `--rounds`
  interleaved rounds over the configurations of one process; each value is one run of the compiled
  decode loop (the executable `generate` compiles) from a copy of the prefilled state, divided by
  its steps; median and min-max;
- cache and parameter bytes per device, measured from the arrays' `addressable_shards`;
- the collectives of the compiled decode program (`pikv_jax.bench.hlo_collectives`): count and
  bytes by op of those inside the decode loop (run once per step) and of those outside it;
- whether the greedy ids equal the 1-device ids.

The device count is fixed when jax starts, so the script measures "1 device" in its own process,
then re-executes itself with XLA_FLAGS=--xla_force_host_platform_device_count=8 for the 8-device
configurations (interleaved there with a 1-device run on that 8-device client, the baseline of
the ratios). Simulated CPU devices share this machine's cores: the numbers show the overhead of
sharding, not a speed-up.

    python scripts/bench_sharded.py                       # -> benchmarks/sharded-cpu.json
    python scripts/bench_sharded.py --quick --out /tmp/s.json   # small model, whole path, ~1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

DEVICES = 8
MESHES = ["data=8", "data=2,model=4", "data=2,seq=4"]
BASE = "1 device"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="2 layers, hidden 128, context 128, 8 new tokens, "
                    "2 rounds: the whole path in about a minute")
    ap.add_argument("--out", default="benchmarks/sharded-cpu.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON path: run the 8-device part
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 128, 256, 512
        args.context, args.new_tokens, args.rounds = 128, 8, 2
    return args


def model_config(args):
    from pikv_jax.config import tiny_config

    return tiny_config(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                       vocab_size=args.vocab, max_position_embeddings=args.context + args.new_tokens + 64)


class ShardedDecode:
    """What `PiKVModel.generate` compiles and runs for (full cache, prompts, new_tokens) on the
    model's mesh, split so that the decode loop can be timed alone: inputs placed and the cache
    sharded as generate places them, prefill run once; `decode_ms()` runs the decode executable
    from a copy of the prefilled state (it donates its input) -> ms per step."""

    def __init__(self, model, prompts, new_tokens: int):
        import jax
        import jax.numpy as jnp

        from pikv_jax.cache.policies.base import CachePolicy, init_policy_cache
        from pikv_jax.runtime import sharding as ms
        from pikv_jax.runtime.generate import GenerationLoop
        from pikv_jax.sampling import SamplingConfig

        cfg = model.config
        self.model, self.ids = model, [list(p) for p in prompts]
        policy = model.bind_policy(CachePolicy())
        tokens, lengths = model.pad_prompt_batch(self.ids)
        caps = tuple(policy.capacity_for(i, tokens.shape[1], new_tokens) for i in range(cfg.num_hidden_layers))
        loop = GenerationLoop(graphdef=model.graphdef, policy=policy, sampling=SamplingConfig(),
                              max_new_tokens=new_tokens, stop_ids=())
        make_cache = functools.partial(init_policy_cache, policy, len(self.ids), caps, dtype=model.cache_dtype,
                                       num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head)
        tokens, lengths, key = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0)
        cache = jax.eval_shape(make_cache)
        if model.mesh is not None:
            tokens, lengths, key, _, _ = model._place_inputs(tokens, lengths, key, None, None)
            cache = ms.with_shardings(cache, ms.cache_shardings(cache, model.mesh))
        (prefill, self.decode, init_cache, _), self.compile_s = model._program(loop, tokens, lengths, cache, key,
                                                                                make_cache=make_cache)
        fresh = jax.block_until_ready(init_cache())
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(prefill(model.params, tokens, lengths, fresh, key, None, None))
        self.prefill_s = time.perf_counter() - t0
        self.last = None

    def decode_ms(self) -> float:
        import jax
        import jax.numpy as jnp

        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, self.state))
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.decode(self.model.params, fresh))
        ms = 1000 * (time.perf_counter() - t0) / max(int(out.step), 1)
        self.last = out
        return ms

    def report(self) -> dict:
        """Bytes per device, the decode program's collectives and the ids of the last decode run."""
        import numpy as np

        from pikv_jax.bench import collective_summary, hlo_collectives
        from pikv_jax.runtime import sharding as ms

        found = hlo_collectives(self.decode.as_text())
        out = self.last
        n = np.asarray(out.num_generated)
        toks = np.asarray(out.tokens)
        return dict(mesh=None if self.model.mesh is None else ms.mesh_summary(self.model.mesh),
                    compile_s=self.compile_s, prefill_s=self.prefill_s, decode_steps=int(out.step),
                    cache_bytes=int(out.cache.nbytes()), cache_bytes_per_device=ms.bytes_per_device(out.cache),
                    param_bytes_per_device=ms.bytes_per_device(self.model.params),
                    collectives_per_step=collective_summary([c for c in found if c["in_loop"]]),
                    collectives_outside_loop=collective_summary([c for c in found if not c["in_loop"]]),
                    largest_collective=max(found, key=lambda c: c["bytes"], default=None),
                    token_ids=[toks[i, : n[i]].tolist() for i in range(len(n))])


def measure(args, names: list[str]) -> dict:
    """Builds one ShardedDecode per name (BASE: no mesh; else a mesh spec), runs the interleaved
    rounds over them -> {"configs": {name: report + decode_ms_per_token}, "ratios", "protocol", ...}."""
    import jax
    import numpy as np

    from pikv_jax.api import PiKVModel
    from pikv_jax.bench import interleaved_rounds, machine_info
    from pikv_jax.parallel import mesh_from_spec

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, args.context).tolist() for _ in range(args.batch)]
    programs = {}
    for name in names:
        model = PiKVModel.from_config(model_config(args), seed=0, mesh=None if name == BASE else mesh_from_spec(name))
        programs[name] = ShardedDecode(model, prompts, args.new_tokens)
        print(f"[{jax.device_count()} devices] {name}: compiled in {programs[name].compile_s:.1f} s, "
              f"prefill {programs[name].prefill_s:.1f} s", flush=True)

    def show(r, vals):
        print(f"  round {r}: " + " | ".join(f"{n} {v:.1f}" for n, v in vals.items()) + " ms/token", flush=True)

    rounds = interleaved_rounds({n: p.decode_ms for n, p in programs.items()}, rounds=args.rounds, warmup=1,
                                self_timed=True, on_round=show)
    timing = rounds.to_json()
    configs = {}
    for name, prog in programs.items():
        configs[name] = dict(decode_ms_per_token=timing["configs"][name], **prog.report())
    ratios = {n: rounds.ratio(n, BASE) for n in names if n != BASE and BASE in names}
    return dict(configs=configs, ratios_vs_1_device=ratios, protocol=timing["protocol"], machine=machine_info())


def child_env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        with open(args.child, "w") as f:
            json.dump(measure(args, [BASE, *MESHES]), f)
        return 0

    import jax

    from pikv_jax.bench import fmt_spread, write_json

    if jax.device_count() != 1:
        raise SystemExit(f"run this without a forced device count (this process has {jax.device_count()} devices); "
                         f"it starts the {DEVICES}-device part itself")
    t0, load_before = time.perf_counter(), os.getloadavg()
    own = measure(args, [BASE])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--child", path]
        subprocess.run(cmd, env=child_env(), check=True)
        multi = json.load(open(path))
    base_ids = own["configs"][BASE]["token_ids"]
    configs = {f"{BASE}, own process": own["configs"][BASE]}
    for name, r in multi["configs"].items():
        configs[f"{BASE}, {DEVICES}-device client" if name == BASE else name] = r
    for r in configs.values():
        r["ids_equal_1_device"] = r.pop("token_ids") == base_ids
    cfg = model_config(args)
    payload = dict(
        what=f"decode ms/token, bytes per device and decode collectives: 1 device vs {DEVICES} simulated CPU devices",
        command="python scripts/bench_sharded.py" + (" --quick" if args.quick else ""),
        notes=[f"CPU: the {DEVICES} simulated devices share this machine's {os.cpu_count()} cores, so the timings "
               "show the overhead of sharding (partitioned programs, collectives, synchronisation), not a speed-up; "
               "the byte counts are what a real mesh would hold and move. Other jobs shared the machine (see "
               "load_average_1_5_15min), so the ranges are wide.",
               f"ratios_vs_1_device: ratio of medians to '{BASE}, {DEVICES}-device client' (an unsharded run in the "
               f"same process, interleaved round by round); '{BASE}, own process' is the same program in a "
               "1-device process, timed in its own rounds before the 8-device process started.",
               "collectives_per_step: collectives of the compiled decode program inside its while loop (run once "
               "per decode step); bytes of each instruction's result (pikv_jax.bench.hlo_collectives).",
               "cache and parameter bytes per device: the largest any one device holds, from addressable_shards."],
        model=dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                   kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head, intermediate=cfg.intermediate_size,
                   vocab=cfg.vocab_size, dtype="float32", weights="random, seed 0"),
        workload=dict(batch=args.batch, context=args.context, new_tokens=args.new_tokens, policy="full",
                      sampling="greedy, stop tokens off"),
        protocol=multi["protocol"], protocol_own_process=own["protocol"],
        configs=configs, ratios_vs_1_device=multi["ratios_vs_1_device"],
        machine=multi["machine"], load_average_1_5_15min=dict(start=load_before, end=os.getloadavg()),
        seconds=round(time.perf_counter() - t0, 1))
    write_json(args.out, payload)
    for name, r in configs.items():
        c = r["collectives_per_step"]
        print(f"{name:32s} {fmt_spread(r['decode_ms_per_token'], '.1f', 'ms/token')}, cache/device "
              f"{r['cache_bytes_per_device'] / 2**20:.1f} MiB, collectives/step {c['count']} ({c['bytes']:,} B), "
              f"ids equal: {r['ids_equal_1_device']}")
    for name, r in payload["ratios_vs_1_device"].items():
        print(f"{name} / {BASE}: {fmt_spread(r, '.2f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
