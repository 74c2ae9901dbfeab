"""Checks of PiKV's expert-sharded KV storage on a device mesh, on 8 CPU devices; run by
test_expert_kv_sharded.py in a subprocess whose XLA_FLAGS give it 8 devices. Prints one JSON line
that the test asserts on.

A tiny random Llama-shaped model (8 KV heads) on data=2,expert=4, against one device:
- greedy ids of expert_kv exact and routed top_k=1 / 2 of 4 shards (the mesh model binds the
  routed policies to `read=mask`, the one device reads with `read=gather`);
- cache bytes per device, measured from the arrays' shards, and the bytes of the expert-split leaves;
- the collectives of the compiled decode program at 1024 slots per layer
  (`pikv_jax.bench.hlo_collectives`), for the bound policies and for routed `read=gather` on the mesh.
"""

from __future__ import annotations

import json
import time

import eight_devices
import jax
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import collective_summary
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method
from pikv_jax.parallel import mesh_from_spec
from pikv_jax.runtime import sharding as ms

METHODS = ["expert_kv(shards=4)", "expert_kv(shards=4,top_k=1)", "expert_kv(shards=4,top_k=2)"]
HLO_METHODS = METHODS[:2] + ["expert_kv(shards=4,top_k=1,read=gather)"]  # the last one not bound to read=mask
LENGTHS = [64, 50, 57, 41]  # 2 rows per data shard; 64 + 8 = 72 slots = 4 shards of 18
MAX_NEW = 8
HLO_CAPACITY = 1024


def config():
    return tiny_config(num_attention_heads=8, num_key_value_heads=8, hidden_size=128, intermediate_size=96,
                       vocab_size=128, num_hidden_layers=2, max_position_embeddings=512)


def prompts(vocab=128):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


def split_bytes(cache) -> tuple[int, int]:
    """(bytes of the leaves split over `expert`, bytes of the rest) of a placed cache."""
    split = rest = 0
    for leaf in jax.tree.leaves(cache):
        if "expert" in jax.tree.leaves(tuple(leaf.sharding.spec)):
            split += leaf.nbytes
        else:
            rest += leaf.nbytes
    return split, rest


def placed_cache(model: PiKVModel, policy):
    """The empty cache `generate` builds for prompts() on `model`'s mesh (placed, concrete)."""
    cfg = model.config
    tokens, _ = model.pad_prompt_batch(prompts())
    caps = tuple(policy.capacity_for(i, tokens.shape[1], MAX_NEW) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, len(LENGTHS), caps, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=model.cache_dtype)
    return jax.device_put(cache, ms.cache_shardings(cache, model.mesh))


def compare(single: PiKVModel, sharded: PiKVModel) -> dict:
    out = {}
    for spec in METHODS:
        policy = parse_method(spec, model=single).policy
        a = single.generate(prompts(), MAX_NEW, policy=policy, stop_ids=())
        b = sharded.generate(prompts(), MAX_NEW, policy=policy, stop_ids=())
        bound = sharded.bind_policy(policy)
        r = dict(equal=a.token_ids == b.token_ids, single=a.token_ids, sharded=b.token_ids,
                 read=[single.bind_policy(policy).read, bound.read], mesh=b.stats.get("mesh"),
                 cache_bytes=a.stats["cache_bytes"], sharded_cache_bytes=b.stats["cache_bytes"],
                 per_device=b.stats["cache_bytes_per_device"], shard_tokens=[a.stats["shard_tokens"],
                                                                            b.stats["shard_tokens"]])
        cache = placed_cache(sharded, bound)
        r["split_bytes"], r["rest_bytes"] = split_bytes(cache)
        r["capacity"] = cache.layers[0].capacity
        k = cache.layers[0].k  # [B, Hkv, C, D]: which slots each device holds
        r["k_shard_slots"] = sorted({(s.index[2].start or 0, s.index[2].stop or k.shape[2])
                                     for s in k.addressable_shards})
        out[spec] = r
    return out


def decode_hlo(model: PiKVModel, spec: str) -> dict:
    """The collectives of `model`'s compiled decode program at HLO_CAPACITY slots per layer,
    compiled as `generate` compiles it (with `bind_policy` unless the spec names its read)."""
    policy = parse_method(spec, model=model).policy
    if "read=" not in spec:
        policy = model.bind_policy(policy)
    found, _ = eight_devices.decode_program_collectives(model, policy, prompts(), HLO_CAPACITY, MAX_NEW)
    step = [c for c in found if c["in_loop"]]
    largest = max(step, key=lambda c: c["largest_array"], default=None)
    return dict(read=policy.read, count=len(step), max_bytes=largest["largest_array"] if largest else 0,
                step_bytes=sum(c["bytes"] for c in step), ops=sorted({c["op"] for c in step}),
                by_op=collective_summary(step)["by_op"], largest=largest and largest["line"][:300])


def errors() -> dict:
    out = {}
    model = PiKVModel.from_config(config(), seed=0, mesh=mesh_from_spec("expert=8"))
    cases = [("expert_not_dividing_shards", "expert_kv(shards=4)"), ("expert_axis_splits_nothing", "h2o@0.5")]
    for name, spec in cases:
        try:
            model.generate(prompts()[:1], MAX_NEW, policy=parse_method(spec, model=model).policy)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def main():
    t0 = time.perf_counter()
    out = {"devices": jax.device_count()}
    single = PiKVModel.from_config(config(), seed=0)
    sharded = PiKVModel.from_config(config(), seed=0, mesh=mesh_from_spec("data=2,expert=4"))
    out["methods"] = compare(single, sharded)
    out["methods_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out["hlo"] = {spec: decode_hlo(sharded, spec) for spec in HLO_METHODS}
    out["hlo_seconds"] = time.perf_counter() - t1
    out["errors"] = errors()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
