"""Checks of sharded generation that need 8 CPU devices; run by test_sharded_generate.py in a
subprocess whose XLA_FLAGS give it 8 devices. Prints one JSON line that the test asserts on.

What it measures on a 2 x 4 (data x model) mesh, for tiny random Llama-shaped models:
- greedy token ids of sharded and single-device generation, per cache method (eviction, KIVI,
  Quest, SVD low-rank codes, DuoAttention's pooled head segments, ...), and whether the method
  evicted (kept < seen);
- cache bytes per device (from the arrays' shards) against the single-device cache bytes;
- the collectives of the compiled decode program at a 1024-slot cache (`pikv_jax.bench.hlo_collectives`):
  ops, count, and the largest single array any of them moves;
- the error messages of bad meshes.
"""

from __future__ import annotations

import json
import time

import eight_devices
import jax
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.cache.policies.duo_attention import DuoAttention
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method
from pikv_jax.parallel import mesh_from_spec

KIVI = "int4(group_size=8,residual_length=16)"
SVD = "svd(rank=8)"  # bases fitted on the single-device model's calibration prefill
DUO = "duo_attention(n_sink=4,window=16,pattern=given)"
# DuoAttention's head pattern, given (calibrating one would only pick another fixed pattern): per
# layer 3 of 8 KV heads retrieve, spread over the model shards (two shards hold none in layer 0)
DUO_PATTERN = ((True, False, False, True, False, True, False, False),
               (False, True, False, False, True, False, False, True))
METHODS = ["full", "streaming_llm@0.5", "h2o@0.5", "tova@0.5", "snapkv(obs_window=16)@0.5",
           "adakv(obs_window=16)@0.5", "quest(dense_layers=1,page_size=8)@0.25", KIVI, f"h2o@0.5+{KIVI}", SVD, DUO]
REPLICATED_HEAD_METHODS = ["full", "h2o@0.5"]
HLO_METHODS = ["full", f"h2o@0.5+{KIVI}", "tova@0.5", SVD]
LENGTHS = [64, 50, 57, 41]  # a ragged batch of 4 rows: 2 per data shard
MAX_NEW = 10
CONTEXT = 64
HLO_CAPACITY = 1024
NUM_LAYERS = 2



def config(kv_heads: int):
    return tiny_config(num_attention_heads=8, num_key_value_heads=kv_heads, hidden_size=128, intermediate_size=96,
                       vocab_size=128, num_hidden_layers=NUM_LAYERS, max_position_embeddings=512)


def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 128, n).tolist() for n in LENGTHS]


def policy_for(spec: str, model: PiKVModel):
    """The cache policy of a method spec (DUO: DuoAttention with DUO_PATTERN)."""
    if spec == DUO:
        return DuoAttention(pattern=DUO_PATTERN, n_sink=4, window=16)
    return parse_method(spec, model=model, context_len=CONTEXT).policy


def compare(single: PiKVModel, sharded: PiKVModel, specs) -> dict:
    out = {}
    for spec in specs:
        t0 = time.perf_counter()
        policy = policy_for(spec, single)
        a = single.generate(prompts(), MAX_NEW, policy=policy)
        t1 = time.perf_counter()
        b = sharded.generate(prompts(), MAX_NEW, policy=policy)
        out[spec] = dict(equal=a.token_ids == b.token_ids, single=a.token_ids, sharded=b.token_ids,
                         evicted=a.stats["kept_tokens"] < a.stats["seen_tokens"],
                         finish_equal=a.finish_reasons == b.finish_reasons, stats_equal=_same_stats(a, b),
                         cache_bytes=a.stats["cache_bytes"], single_per_device=a.stats["cache_bytes_per_device"],
                         per_device=b.stats["cache_bytes_per_device"], mesh=b.stats.get("mesh"),
                         row_bytes=row_state_bytes(single, policy), meta_bytes=unbatched_bytes(single, policy),
                         seconds=[round(t1 - t0, 2), round(time.perf_counter() - t1, 2)])
    return out


def _same_stats(a, b) -> bool:
    keys = ("batch", "prompt_tokens", "generated_tokens", "cache_bytes", "full_cache_bytes", "kept_tokens",
            "seen_tokens", "cache_fill")
    return all(a.stats[k] == b.stats[k] for k in keys)


def row_state_bytes(model: PiKVModel, policy) -> int:
    """Bytes of the cache's per-row leaves (rank <= 1: lengths, flags), which split over `data`
    only; every other leaf of a per-head layout is [B, Hkv, ...] or has no batch axis."""
    return sum(x.size * x.dtype.itemsize for x in cache_leaves(model, policy)
               if x.ndim == 1 and x.shape[0] == len(LENGTHS))


def unbatched_bytes(model: PiKVModel, policy) -> int:
    """Bytes of the cache's leaves without a batch axis (the low-rank layout's per-head bases
    [Hkv, D, r]; scalars), which every device holds in full."""
    return sum(x.size * x.dtype.itemsize for x in cache_leaves(model, policy)
               if x.ndim == 0 or x.shape[0] != len(LENGTHS))


def cache_leaves(model: PiKVModel, policy) -> list:
    """The abstract leaves of the cache `generate` makes for `prompts()`."""
    policy = model.bind_policy(policy)
    cfg = model.config
    tokens, _ = model.pad_prompt_batch(prompts())
    caps = tuple(policy.capacity_for(i, tokens.shape[1], MAX_NEW) for i in range(cfg.num_hidden_layers))
    cache = jax.eval_shape(lambda: init_policy_cache(policy, len(LENGTHS), caps, num_kv_heads=cfg.num_key_value_heads,
                                                     head_dim=cfg.dim_per_head, dtype=model.cache_dtype))
    return jax.tree.leaves(cache)


def decode_hlo(model: PiKVModel, spec: str) -> dict:
    """The collectives of `model`'s compiled decode program (the while loop of decode steps) at a
    cache of HLO_CAPACITY slots per layer, compiled as `generate` compiles it."""
    return hlo_summary(*decode_collectives(model, spec))


def hlo_summary(found: list[dict], capacity: int) -> dict:
    # per array: XLA may combine several all-reduces (e.g. one per layer) into one tuple-shaped instruction
    return dict(count=len(found), max_bytes=max((c["largest_array"] for c in found), default=0),
                ops=sorted({c["op"] for c in found}),
                largest=max(found, key=lambda c: c["largest_array"], default=None), capacity=capacity)


def decode_collectives(model: PiKVModel, spec: str) -> tuple[list[dict], int]:
    """(`hlo_collectives` of the decode program that `decode_hlo` describes, its cache capacity)."""
    policy = model.bind_policy(policy_for(spec, model))
    found, cache = eight_devices.decode_program_collectives(model, policy, prompts(), HLO_CAPACITY, MAX_NEW)
    return found, max(cache.capacities())


def errors() -> dict:
    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)

    catch("unknown_axis", lambda: mesh_from_spec("data=2,tensor=4"))
    catch("too_large", lambda: mesh_from_spec("data=4,model=4"))
    catch("non_positive", lambda: mesh_from_spec("data=0,model=4"))
    catch("malformed", lambda: mesh_from_spec("data2"))
    # model=8 divides neither 6 KV heads, 6 query heads nor an MLP hidden size of 36
    bad = tiny_config(num_attention_heads=6, num_key_value_heads=6, hidden_size=96, intermediate_size=36)
    catch("model_axis", lambda: PiKVModel.from_config(bad, mesh=mesh_from_spec("model=8")))
    return out


def main():
    t0 = time.perf_counter()
    out = {"devices": jax.device_count()}
    mesh = mesh_from_spec("data=2,model=4")
    single = PiKVModel.from_config(config(8), seed=0)
    sharded = PiKVModel.from_config(config(8), seed=0, mesh=mesh)
    out["param_specs"] = {".".join(map(str, p)): str(v.get_value().sharding.spec)
                          for p, v in __import__("flax").nnx.to_flat_state(sharded.params)
                          if str(p[0]) != "layers" or str(p[1]) == "0"}
    out["methods"] = compare(single, sharded, METHODS)

    # an odd batch on the data axis: padded with a throwaway row, dropped from the output
    # (rows are independent, so the reference is the first 3 rows of the 4-row single-device run)
    odd = sharded.generate(prompts()[:3], MAX_NEW, policy=parse_method("h2o@0.5", model=single).policy)
    out["odd_batch"] = dict(equal=odd.token_ids == out["methods"]["h2o@0.5"]["single"][:3],
                            rows=len(odd.token_ids), finish=len(odd.finish_reasons), batch=odd.stats["batch"],
                            seen=odd.stats["seen_tokens"], seen_expected=sum(LENGTHS[:3]) + 3 * (MAX_NEW - 1))

    # the same with suffixes and a streaming callback: the callback sees the real rows only
    def streamed(model):
        steps = []
        res = model.generate(prompts()[:3], MAX_NEW, policy=parse_method("h2o@0.5", model=single).policy,
                             suffixes=[[9, 10], [11], [12, 13, 14]],
                             callback=lambda step, tok, emitted: steps.append((np.asarray(tok).tolist(),
                                                                               np.asarray(emitted).tolist())))
        return res, steps

    (a, sa), (b, sb) = streamed(single), streamed(sharded)
    out["odd_batch_streamed"] = dict(equal=a.token_ids == b.token_ids, callbacks_equal=sa == sb,
                                     rows=sorted({len(t) for t, _ in sb}), steps=len(sb))

    # 2 KV heads on model=4: the replicated-head layout
    single2 = PiKVModel.from_config(config(2), seed=1)
    sharded2 = PiKVModel.from_config(config(2), seed=1, mesh=mesh)
    out["replicated_head"] = compare(single2, sharded2, REPLICATED_HEAD_METHODS)
    out["replicated_head_q_spec"] = str(sharded2.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
                                        .get_value().sharding.spec)
    out["replicated_head_mlp_spec"] = str(sharded2.params["layers"][0]["mlp"]["gate_proj"]["kernel"]
                                          .get_value().sharding.spec)

    t_hlo = time.perf_counter()
    out["hlo"] = {spec: decode_hlo(sharded, spec) for spec in HLO_METHODS}
    out["hlo_replicated_head"] = {spec: decode_hlo(sharded2, spec) for spec in ["h2o@0.5"]}
    out["hlo_seconds"] = time.perf_counter() - t_hlo
    out["errors"] = errors()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
