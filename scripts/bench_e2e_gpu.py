"""Decode ms/step of a Llama-3-8B-shaped model (random bf16 weights) with a 32k-token cache on one
GPU, for full bf16, a 25% budget (H2O, evicting every step, so the attention mass is used), int4
(KIVI) and 25% + int4, at batch 1 and 8, with the XLA and the Pallas attention paths, against the
roofline (weights + cache bytes read per step) / copy bandwidth measured in the same run.

    python scripts/bench_e2e_gpu.py                         # writes benchmarks/e2e-<card>.json
    python scripts/bench_e2e_gpu.py --quick --out /tmp/e.json   # tiny model, short context (smoke run)
    python scripts/bench_e2e_gpu.py --mesh data=2,model=4   # sharded over 8 devices (XLA attention)

With --mesh the parameters are placed under the sharding rules (pikv_jax/parallel/sharding.py),
each cache layer is placed as generation places it (rows over `data`, KV heads over `model`) as it
is built, and the decode loop pins the state's placement (api.generation_functions). Rows then
also report bytes per device, the roofline over per-device bytes, and the collectives one decode
step runs (from the compiled HLO). On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 with
--quick gives a smoke run. A mesh that is malformed, names an unknown axis, needs more devices than
there are, or cannot split the model is a one-line error before any work.

How the cache is made: a prefill of 8 x 32k tokens would dominate the run and may not fit, so each
layer's cache is built directly, holding random keys and values for `context` positions (the
25% policies hold 8192 of them: 4 sinks, a spread of older positions and the 4096 most recent,
with random scores); KIVI caches are quantized from such random data by the policy's own
`from_uniform`. Then the jitted generation loop (GenerationLoop.decode: lax.while_loop over
decode steps, the cache donated) runs `steps` greedy steps once to warm up and again timed.
Every run is compiled afresh (jax.clear_caches) so the attention implementation chosen by
`set_attention_impl` is the one traced. Runs are ordered by importance and the script stops
starting new ones after --time-budget seconds; skipped runs are listed in the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # 8 x 32k bf16 cache (34 GB) + 16 GB weights

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from optional_deps import stub_missing_optional_deps  # noqa: E402

STUBBED = stub_missing_optional_deps()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pikv_jax.api import generation_functions  # noqa: E402
from pikv_jax.bench import collective_summary, device_and_ceiling, hlo_collectives, machine_info, write_json  # noqa: E402
from pikv_jax.cache.policies import make_policy  # noqa: E402
from pikv_jax.cache.policies.base import CachePolicy  # noqa: E402
from pikv_jax.cache.state import KVCache, LayerCache, tree_nbytes  # noqa: E402
from pikv_jax.compress.kivi import QuantizedPolicy  # noqa: E402
from pikv_jax.config import preset, tiny_config  # noqa: E402
from pikv_jax.kernels import common  # noqa: E402
from pikv_jax.models.llama import CausalLM  # noqa: E402
from pikv_jax.parallel import mesh_from_spec, parse_mesh_spec, state_shardings  # noqa: E402
from pikv_jax.runtime import sharding as rsh  # noqa: E402
from pikv_jax.runtime.generate import RUNNING, DecodeState, GenerationLoop  # noqa: E402
from pikv_jax.sampling import SamplingConfig  # noqa: E402

CONFIGS = ("full", "budget25", "int4", "budget25_int4")


def random_params(cfg, dtype, seed: int = 0):
    """(graphdef, params): abstract init (no memory), then one jitted random normal per parameter
    (std 1 / sqrt(fan_in), norms = 1) directly in `dtype` on the device."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key, shape, dt, std):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dt)

    counter = [0]

    def init(path, leaf):
        counter[0] += 1
        names = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        shape, dt = tuple(leaf.shape), leaf.dtype
        if "norm" in names:
            return jnp.ones(shape, dt)
        if "bias" in names:
            return jnp.zeros(shape, dt)
        std = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 and "embed" not in names else 0.02
        return normal(jax.random.key(seed * 100003 + counter[0]), shape, dt, float(std))

    params = jax.tree_util.tree_map_with_path(init, state)
    return graphdef, params


def make_policy_for(name: str) -> CachePolicy:
    h2o = make_policy("h2o", budget_ratio=0.25)  # decode_evict: scores from the attention mass every step
    return {"full": CachePolicy(), "budget25": h2o, "int4": QuantizedPolicy(bits=4),
            "budget25_int4": QuantizedPolicy(bits=4, inner=h2o)}[name]


def resident_positions(n_slots: int, context: int, rng) -> np.ndarray:
    """Positions kept by a budget of n_slots out of `context`: 4 sinks, the most recent half, and a
    sorted random spread of the rest."""
    if n_slots >= context:
        return np.arange(context)
    recent = n_slots // 2
    middle = rng.choice(np.arange(4, context - recent), n_slots - recent - 4, replace=False)
    return np.sort(np.concatenate([np.arange(4), middle, np.arange(context - recent, context)]))


def build_cache(policy: CachePolicy, cfg, batch: int, context: int, extra: int, dtype, seed: int, mesh=None):
    """KVCache holding `context` seen tokens per row (length = context), built layer by layer; with
    a mesh each layer is placed as generation places it right after it is built (so one device
    never holds more than one layer of a cache that only fits split)."""
    hk, d, n_layers = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_hidden_layers
    cap = policy.capacity_for(0, context, extra)
    kept = min(policy.layer_budget(0, context), cap)
    positions = resident_positions(kept, context, np.random.default_rng(seed))
    n = len(positions)
    inner = policy.inner if isinstance(policy, QuantizedPolicy) else policy
    tmp_cap = n if isinstance(policy, QuantizedPolicy) else cap

    @jax.jit
    def layer(key):
        k1, k2, k3 = jax.random.split(key, 3)
        shape = (batch, hk, tmp_cap, d)
        pos = jnp.full((batch, hk, tmp_cap), -1, jnp.int32).at[:, :, :n].set(jnp.asarray(positions, jnp.int32))
        score = jnp.where(pos >= 0, jax.random.uniform(k3, pos.shape), 0.0) if inner.evicts else jnp.zeros(pos.shape)
        uniform = LayerCache(k=jax.random.normal(k1, shape, dtype), v=jax.random.normal(k2, shape, dtype), pos=pos,
                             score=score.astype(jnp.float32))
        if not isinstance(policy, QuantizedPolicy):
            return uniform
        empty = policy.init_layer_cache(0, batch, hk, cap, d, dtype)
        return policy.from_uniform(empty, uniform)

    def placed(x):
        if mesh is None:
            return x
        one = KVCache(layers=(x,), length=jnp.zeros((batch,), jnp.int32))
        return jax.device_put(one, rsh.cache_shardings(one, mesh)).layers[0]

    layers = tuple(placed(layer(jax.random.key(seed * 1000 + i))) for i in range(n_layers))
    length = jnp.full((batch,), context, jnp.int32)
    cache = KVCache(layers=layers, length=length)
    if mesh is not None:
        cache = dataclasses.replace(cache, length=jax.device_put(length, rsh.cache_shardings(cache, mesh).length))
    return cache, cap


def cache_read_bytes(cache: KVCache, policy: CachePolicy) -> int:
    """Bytes a decode step reads from the cache: keys / values (or codes, scales, minimums and the
    ring), positions, and scores when the policy evicts (it reads them to pick a victim)."""
    return sum(int(a.nbytes) for a in cache_read_arrays(cache, policy))


def cache_read_arrays(cache: KVCache, policy: CachePolicy) -> list:
    """The arrays `cache_read_bytes` counts (their shards give the bytes each device reads)."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, LayerCache):
            arrays = [layer.k, layer.v, layer.pos]
        else:
            arrays = [layer.kq, layer.k_scale, layer.k_min, layer.vq, layer.v_scale, layer.v_min, layer.k_res,
                      layer.v_res, layer.pos]
        if policy.evicts:
            arrays.append(layer.score)
        out += arrays
    return out


def reset(state: DecodeState, steps: int) -> DecodeState:
    b = state.last.shape[0]
    return dataclasses.replace(state, step=jnp.zeros((), jnp.int32), tokens=jnp.full((b, steps), -1, jnp.int32),
                               num_generated=jnp.zeros((b,), jnp.int32), finish=jnp.full((b,), RUNNING, jnp.int32))


def run_one(name, impl, batch, args, cfg, graphdef, params, param_bytes, bw, mesh=None) -> dict:
    policy = make_policy_for(name)
    dtype = jnp.bfloat16
    steps = args.steps
    extra = 3 * steps + 64  # warm-up and timed runs append tokens to non-evicting caches
    t0 = time.perf_counter()
    cache, cap = build_cache(policy, cfg, batch, args.context, extra, dtype, seed=batch, mesh=mesh)
    jax.block_until_ready(cache)
    build_s = time.perf_counter() - t0
    read = cache_read_bytes(cache, policy)
    read_per_device = rsh.bytes_per_device(cache_read_arrays(cache, policy))
    cache_per_device = rsh.bytes_per_device(cache)
    loop = GenerationLoop(graphdef=graphdef, policy=policy, sampling=SamplingConfig(), max_new_tokens=steps,
                          stop_ids=())
    key = jax.random.key(0)
    state = DecodeState(step=jnp.zeros((), jnp.int32),
                        last=jax.random.randint(key, (batch,), 3, cfg.vocab_size, jnp.int32),
                        tokens=jnp.full((batch, steps), -1, jnp.int32), num_generated=jnp.zeros((batch,), jnp.int32),
                        finish=jnp.full((batch,), RUNNING, jnp.int32), cache=cache, key=key)
    del cache
    if mesh is not None:
        state = jax.device_put(state, rsh.state_shardings(state, mesh))
    jax.clear_caches()  # trace anew under this impl
    common.set_attention_impl(impl)
    try:
        t0 = time.perf_counter()
        if mesh is None:
            decode = GenerationLoop.decode.lower(loop, params, state).compile()
        else:  # the loop state's placement pinned on the output, the cache donated (as generate runs it)
            decode = jax.jit(generation_functions(loop, mesh)[1], donate_argnums=1).lower(params, state).compile()
        compile_s = time.perf_counter() - t0
        collectives = collective_summary([c for c in hlo_collectives(decode.as_text()) if c["in_loop"]])
        state = decode(params, state)  # warm-up
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            state = reset(state, steps)
            t0 = time.perf_counter()
            state = decode(params, state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
    finally:
        common.set_attention_impl(None)
    done_steps = int(state.step)
    ms = 1e3 * float(np.median(times)) / max(done_steps, 1)
    step_bytes = param_bytes + read
    roofline_ms = 1e3 * step_bytes / (bw["copy_GBps"] * 1e9)
    row = dict(config=name, policy=policy.label, impl=impl, batch=batch, context=args.context, cache_slots=cap,
               steps=done_steps, ms_per_step=ms, tokens_per_s=batch * 1e3 / ms, param_bytes=param_bytes,
               cache_read_bytes=read, bytes_per_step=step_bytes, roofline_ms=roofline_ms,
               roofline_ms_read_bw=1e3 * step_bytes / (bw["read_GBps"] * 1e9), x_roofline=ms / roofline_ms,
               achieved_GBps=step_bytes / (ms / 1e3) / 1e9, compile_s=compile_s, build_s=build_s,
               finish=np.asarray(state.finish).tolist())
    if mesh is not None:  # one step of every device reads its own shards: the roofline is per device
        step_dev = rsh.bytes_per_device(params) + read_per_device
        roofline_dev = 1e3 * step_dev / (bw["copy_GBps"] * 1e9)
        row.update(mesh=rsh.mesh_summary(mesh), cache_bytes_per_device=cache_per_device,
                   cache_read_bytes_per_device=read_per_device, bytes_per_step_per_device=step_dev,
                   roofline_ms=roofline_dev, x_roofline=ms / roofline_dev, decode_step_collectives=collectives)
    del state
    return row


def mesh_arg(spec: str) -> str:
    """argparse type of --mesh: the spec checked by `parse_mesh_spec` (argparse prints its one-line
    error); devices and the model are checked once they are known."""
    try:
        parse_mesh_spec(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and context (smoke run)")
    ap.add_argument("--context", type=int, default=None, help="default 32768 (quick: 1024)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--impls", nargs="+", default=None, choices=["xla", "pallas"],
                    help="default: xla pallas (with --mesh: xla; the Pallas kernels are not partitioned)")
    ap.add_argument("--mesh", default=None, type=mesh_arg, metavar="AXIS=N,...",
                    help="shard over a device mesh, e.g. data=2,model=4 (axes: data, model, expert, seq)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=270.0, help="no new run starts after this many seconds")
    ap.add_argument("--out", default=None, help="default: benchmarks/e2e-<card>.json")
    args = ap.parse_args()
    args.context = args.context or (1024 if args.quick else 32768)
    args.impls = args.impls or (["xla"] if args.mesh else ["xla", "pallas"])
    t_start = time.perf_counter()
    cfg = (tiny_config("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=128) if args.quick
           else preset("llama3-8b"))  # quick: head_dim 32, so KIVI groups of 32 fit
    mesh = None
    if args.mesh:
        try:  # too few devices, or a model axis that splits nothing: one line, before any work
            mesh = mesh_from_spec(args.mesh)
            rsh.check_mesh(cfg, mesh)
        except ValueError as e:
            ap.error(f"--mesh {args.mesh}: {e}")
    card, bw = device_and_ceiling(args.quick)
    print(f"model {'tiny' if args.quick else 'llama3-8b'}, context {args.context}")
    t0 = time.perf_counter()
    graphdef, params = random_params(cfg, jnp.bfloat16)
    if mesh is not None:
        params = jax.device_put(params, state_shardings(params, mesh, counts=rsh.model_counts(cfg)))
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    param_bytes = tree_nbytes(params)
    print(f"random bf16 weights: {param_bytes / 1e9:.2f} GB in {init_s:.1f} s"
          + (f", {rsh.bytes_per_device(params) / 1e9:.2f} GB per device on {args.mesh}" if mesh is not None else ""))
    # importance order: batch 8 first, XLA and Pallas of each config side by side
    plan = [(c, i, b) for b in args.batches for c in args.configs for i in args.impls]
    rows, skipped = [], []
    for name, impl, batch in plan:
        if time.perf_counter() - t_start > args.time_budget:
            skipped.append(dict(config=name, impl=impl, batch=batch, reason="time budget"))
            continue
        try:
            row = run_one(name, impl, batch, args, cfg, graphdef, params, param_bytes, bw, mesh)
            rows.append(row)
            print(f"{name:14s} {impl:6s} B={batch}: {row['ms_per_step']:7.2f} ms/step (roofline "
                  f"{row['roofline_ms']:6.2f} ms, {row['x_roofline']:.2f}x; compile {row['compile_s']:.0f} s)")
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory at batch 8)
            rows.append(dict(config=name, impl=impl, batch=batch, error=f"{type(e).__name__}: {str(e)[:1500]}",
                             traceback=traceback.format_exc()[-3000:]))
            print(f"{name} {impl} B={batch}: FAILED {type(e).__name__}: {str(e)[:300]}")
    by = {(r["config"], r["impl"], r["batch"]): r for r in rows if "ms_per_step" in r}
    comparisons = []
    for (name, impl, batch), r in by.items():
        if impl == "pallas" and (name, "xla", batch) in by:
            comparisons.append(dict(config=name, batch=batch,
                                    x_xla=by[(name, "xla", batch)]["ms_per_step"] / r["ms_per_step"]))
    payload = {"benchmark": "e2e_decode", "card": card, "stubbed_missing_modules": STUBBED,
               "model": "tiny" if args.quick else "llama3-8b", "weights": "random bf16 (std 1/sqrt(fan_in), norms 1)",
               "machine": machine_info(), "bandwidth": bw,
               "param_bytes": param_bytes, "init_s": init_s, "context": args.context, "steps": args.steps,
               "mesh": None if mesh is None else rsh.mesh_summary(mesh),
               "rows": rows, "pallas_vs_xla": comparisons, "skipped": skipped,
               "method": ("cache built directly with random keys/values at `context` positions (no prefill); "
                          "the jitted decode loop runs `steps` greedy steps (warm-up, then timed `repeats` "
                          "times, median); roofline = (weights + cache bytes read per step) / copy bandwidth "
                          "measured in this run (roofline_ms_read_bw uses the read bandwidth instead)."),
               "wall_s": time.perf_counter() - t_start}
    write_json(args.out or f"benchmarks/e2e-{card}.json", payload)


if __name__ == "__main__":
    main()
