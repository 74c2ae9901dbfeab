"""Decode speed of quantized KV caches against the full bf16 cache: SmolLM2 on this CPU, batch 1.

For each cache (full bf16, KIVI int8, KIVI int4; G=32, R=128): a random prompt of `--context`
tokens, greedy decode of `--new-tokens` tokens with stop tokens disabled, through
`PiKVModel.generate(policy=...)` once per cache (compiles, end-to-end stats), then the same compiled
decode loop is timed alone from the prefilled state in `--rounds` interleaved rounds (median
reported, every round kept): on a shared machine, interleaving spreads others' load evenly. Bytes read
per decode step = every parameter once (the tied embedding is the output head) + the cache arrays
attention reads (keys and values, or codes + scales + minimums + the full-precision ring, and
positions). The roofline divides them by the read bandwidth measured in the same run.

A second table isolates one layer's decode attention at the same context (jitted, median of
repeats): dense bf16 attention against dequantize-then-attend, the unfused path that the fused
kernels issue replaces.

    python scripts/bench_compress_decode.py                        # 4k context, 32 new tokens
    python scripts/bench_compress_decode.py --context 1024 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import machine_info, measure_bandwidth, time_fn, write_json
from pikv_jax.cache.policies.base import CachePolicy, init_policy_cache
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.cache.state import LayerCache, tree_nbytes
from pikv_jax.compress.kivi import QuantizedPolicy

READ_FIELDS = {LayerCache: ("k", "v", "pos"),
               QuantizedLayerCache: ("kq", "k_scale", "k_min", "vq", "v_scale", "v_min", "k_res", "v_res", "pos")}


def policies(group: int, residual: int) -> dict:
    return {"full-bf16": CachePolicy(),
            "int8": QuantizedPolicy(bits=8, group_size=group, residual_length=residual),
            "int4": QuantizedPolicy(bits=4, group_size=group, residual_length=residual)}


def cache_shapes(model: PiKVModel, policy, prompt_len: int, new_tokens: int):
    cfg = model.config
    caps = tuple(policy.capacity_for(i, prompt_len, new_tokens) for i in range(cfg.num_hidden_layers))
    return jax.eval_shape(lambda: init_policy_cache(policy, 1, caps, num_kv_heads=cfg.num_key_value_heads,
                                                    head_dim=cfg.dim_per_head, dtype=model.cache_dtype))


def kv_bytes_read(cache) -> int:
    """Bytes of the arrays a decode step's attention reads, over all layers."""
    return sum(tree_nbytes([getattr(layer, f) for f in READ_FIELDS[type(layer)]]) for layer in cache.layers)


def prefilled(model: PiKVModel, policy, prompt, new_tokens: int):
    """(decode executable, params, prefilled state) for timing decode alone. Reuses the executables
    `generate` compiled for the same loop and shapes (PiKVModel._compile caches them)."""
    from pikv_jax.runtime.generate import GenerationLoop, pad_prompts
    from pikv_jax.sampling import SamplingConfig

    cfg = model.config
    tokens, lengths = (jnp.asarray(x) for x in pad_prompts([prompt], pad_id=model.tokenizer.eos_token_id))
    loop = GenerationLoop(graphdef=model.graphdef, policy=policy, sampling=SamplingConfig(temperature=0.0, top_k=0,
                          top_p=1.0), max_new_tokens=new_tokens, stop_ids=())
    caps = tuple(policy.capacity_for(i, tokens.shape[1], new_tokens) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, 1, caps, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                              dtype=model.cache_dtype)
    key = jax.random.key(0)
    prefill, decode, _ = model._compile(loop, tokens, lengths, cache, key)
    state = jax.block_until_ready(prefill(model.params, tokens, lengths, cache, key, None, None))
    return decode, model.params, state


def time_decode(decode, params, state) -> float:
    """ms per decode step of one run of the decode loop from a copy of the prefilled state."""
    import time

    fresh = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, state))  # decode donates its input
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(params, fresh))
    return 1000 * (time.perf_counter() - t0) / int(out.step)


def attention_microbench(model: PiKVModel, pols: dict, context: int, repeats: int) -> list[dict]:
    """One layer's decode attention over a filled cache of `context` tokens, per policy."""
    cfg = model.config
    rng = np.random.default_rng(0)
    hk, d, h = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_attention_heads
    k = jnp.asarray(rng.normal(size=(1, context, hk, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, context, hk, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, context, h, d)), jnp.float32)
    pos = jnp.arange(context, dtype=jnp.int32)[None]
    from pikv_jax.cache.policies.base import PrefillContext

    ctx = PrefillContext(q=q, k=k, v=v, pos=pos, lengths=jnp.array([context]), key_mass=None, shared={})
    caches, fns = {}, {}
    for name, policy in pols.items():
        caches[name] = policy.prefill(0, policy.init_layer_cache(0, 1, hk, context, d, model.cache_dtype), ctx)
        fns[name] = jax.jit(functools.partial(lambda p, c, qq: p.attend(0, c, qq, jnp.array([context - 1]))[0], policy))
    times = {name: [] for name in pols}
    for name in pols:
        jax.block_until_ready(fns[name](caches[name], q[:, -1]))  # compile
    for _ in range(repeats):  # interleaved repeats, median reported
        for name in pols:
            times[name].append(time_fn(fns[name], caches[name], q[:, -1], repeats=1, warmup=0))
    rows = []
    for name in pols:
        cache, t = caches[name], float(np.median(times[name]))
        rows.append(dict(cache=name, layer_cache_bytes=cache.nbytes(),
                         kv_bytes_read=tree_nbytes([getattr(cache, f) for f in READ_FIELDS[type(cache)]]),
                         attention_ms=1000 * t))
        print(f"  attention {name:10s}: {1000 * t:7.3f} ms/layer, {rows[-1]['kv_bytes_read'] / 2**20:6.2f} MiB read")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--residual-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30, help="repeats of the attention microbenchmark")
    ap.add_argument("--rounds", type=int, default=5, help="timed decode runs per cache (interleaved; the median "
                    "is reported)")
    ap.add_argument("--out", default="benchmarks/compress-decode-cpu.json")
    args = ap.parse_args()

    bw = measure_bandwidth()
    print(f"bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    model = PiKVModel.from_pretrained(args.model, dtype=args.dtype, cache_dtype="bfloat16")
    param_bytes = tree_nbytes(model.params)
    prompt = np.random.default_rng(0).integers(100, model.config.vocab_size, args.context).tolist()
    pols = policies(args.group_size, args.residual_length)
    outs = {name: model.generate([prompt], args.new_tokens, policy=policy, stop_ids=())  # compiles
            for name, policy in pols.items()}
    states = {name: prefilled(model, policy, prompt, args.new_tokens) for name, policy in pols.items()}
    runs = {name: [] for name in pols}
    for r in range(args.rounds):  # interleaved: load from other processes hits every cache alike
        for name in pols:
            runs[name].append(time_decode(*states[name]))
        print(f"  round {r}: " + " | ".join(f"{n} {runs[n][-1]:6.1f}" for n in pols) + " ms/token")
    rows = []
    for name, policy in pols.items():
        s = outs[name].stats
        ms = float(np.median(runs[name]))
        kv = kv_bytes_read(cache_shapes(model, policy, len(prompt), args.new_tokens))
        step = param_bytes + kv
        roof = 1000 * step / (bw["read_GBps"] * 1e9)
        rows.append(dict(cache=name, policy=s["policy"], decode_ms_per_token=ms,
                         decode_ms_per_token_min=min(runs[name]),
                         decode_ms_per_token_rounds=runs[name], generate_decode_ms_per_token=s["decode_ms_per_token"],
                         prefill_s=s["prefill_s"], cache_bytes=s["cache_bytes"], full_cache_bytes=s["full_cache_bytes"],
                         param_bytes=param_bytes, kv_bytes_read_per_step=kv, bytes_per_step=step,
                         roofline_ms=roof, x_of_roofline=ms / roof, achieved_GBps=step / (ms / 1000) / 1e9,
                         compile_s=s["compile_s"], text=outs[name].texts[0][:60]))
        print(f"{name:10s}: decode {ms:7.1f} ms/token (median of {args.rounds}) | bytes/step {step / 2**20:7.1f} MiB "
              f"(KV {kv / 2**20:6.1f} MiB) | roofline {roof:6.1f} ms ({rows[-1]['x_of_roofline']:.2f}x)")
    base = rows[0]["decode_ms_per_token"]
    for r in rows:
        r["ms_vs_full"] = r["decode_ms_per_token"] / base
        r["kv_bytes_vs_full"] = r["kv_bytes_read_per_step"] / rows[0]["kv_bytes_read_per_step"]
    print("one layer's decode attention:")
    attn = attention_microbench(model, pols, args.context + args.new_tokens, args.repeats)
    for r in attn:
        r["ms_vs_full"] = r["attention_ms"] / attn[0]["attention_ms"]
    write_json(args.out, {"benchmark": "compress-decode", "model": args.model, "dtype": args.dtype,
                          "cache_dtype": "bfloat16", "context": args.context, "batch": 1,
                          "new_tokens": args.new_tokens, "group_size": args.group_size,
                          "residual_length": args.residual_length, "bandwidth": bw, "machine": machine_info(),
                          "results": rows, "attention_one_layer": attn})


if __name__ == "__main__":
    main()
