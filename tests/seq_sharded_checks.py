"""Checks of generation with the cache's slot axis split over a `seq` mesh axis, on 8 CPU devices;
run by test_seq_sharded_generate.py in a subprocess whose XLA_FLAGS give it 8 devices. Prints one
JSON line that the test asserts on.

What it measures, for a tiny random Llama-shaped model with 8 KV heads (and, with --smollm2, the
bundled SmolLM2 with 3 KV heads):
- greedy token ids of `data=2,seq=4` (and `model=2,seq=4`) generation against one device's, per
  cache method, and whether the method evicted;
- cache bytes per device, measured from the arrays' shards, and the bytes of the seq-split leaves;
- the collectives of the compiled decode program at a 1024-slot cache (`pikv_jax.bench.hlo_collectives`);
- the error of a seq size that does not divide an evicting policy's budget.
"""

from __future__ import annotations

import json
import sys
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

KIVI = "int4(group_size=8,residual_length=8)"  # 72 slots: 64 quantized = 8 key groups, 2 per seq shard
METHODS = ["full", "streaming_llm@0.5", "h2o@0.5", "tova@0.5", "snapkv(obs_window=16)@0.5",
           "quest(dense_layers=1,page_size=2)@0.25", KIVI]
SECOND_MESH_METHODS = ["full", "tova@0.5"]  # TOVA's head mean is a row-level score: the case `model` changes
HLO_METHODS = ["full", "streaming_llm@0.5", "h2o@0.5", "tova@0.5",
               "quest(dense_layers=1,page_size=8)@0.25", KIVI, f"h2o@0.5+{KIVI}"]
LENGTHS = [64, 50, 57, 41]  # a ragged batch of 4 rows: 2 per data shard; padded to 64
MAX_NEW = 8  # the full cache holds 64 + 8 = 72 slots: 18 per device on seq=4, 9 on seq=8
CONTEXT = 64
HLO_CAPACITY = 1024
NUM_LAYERS = 2


def config():
    return tiny_config(num_attention_heads=8, num_key_value_heads=8, hidden_size=128, intermediate_size=96,
                       vocab_size=128, num_hidden_layers=NUM_LAYERS, max_position_embeddings=512)


def prompts(lengths=LENGTHS, vocab=128):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def seq_split_bytes(cache) -> tuple[int, int]:
    """(bytes of the leaves split over `seq`, bytes of the rest) of a placed cache."""
    split = rest = 0
    for leaf in jax.tree.leaves(cache):
        if "seq" in jax.tree.leaves(tuple(leaf.sharding.spec)):
            split += leaf.nbytes
        else:
            rest += leaf.nbytes
    return split, rest


def placed_cache(model: PiKVModel, policy, capacities=None):
    """The empty cache `generate` would build for prompts() on `model`'s mesh (placed, concrete)."""
    policy = model.bind_policy(policy)
    cfg = model.config
    tokens, _ = model.pad_prompt_batch(prompts())
    caps = capacities or tuple(policy.capacity_for(i, tokens.shape[1], MAX_NEW) for i in range(cfg.num_hidden_layers))
    caps = ms.seq_capacities(caps, policy.evicts, model.mesh)
    cache = init_policy_cache(policy, len(LENGTHS), caps, num_kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.dim_per_head, dtype=model.cache_dtype)
    return jax.device_put(cache, ms.cache_shardings(cache, model.mesh))


def compare(single: PiKVModel, sharded: PiKVModel, specs, lengths=LENGTHS, max_new=MAX_NEW) -> dict:
    out = {}
    for spec in specs:
        policy = parse_method(spec, model=single, context_len=CONTEXT).policy
        t0 = time.perf_counter()
        a = single.generate(prompts(lengths, single.config.vocab_size), max_new, policy=policy)
        t1 = time.perf_counter()
        b = sharded.generate(prompts(lengths, single.config.vocab_size), max_new, policy=policy)
        r = dict(equal=a.token_ids == b.token_ids, single=a.token_ids, sharded=b.token_ids,
                 evicted=a.stats["kept_tokens"] < a.stats["seen_tokens"],
                 finish_equal=a.finish_reasons == b.finish_reasons, mesh=b.stats.get("mesh"),
                 cache_bytes=a.stats["cache_bytes"], sharded_cache_bytes=b.stats["cache_bytes"],
                 per_device=b.stats["cache_bytes_per_device"],
                 seconds=[round(t1 - t0, 2), round(time.perf_counter() - t1, 2)])
        if len(lengths) == len(LENGTHS) and single.config.num_key_value_heads == 8:
            r["split_bytes"], r["rest_bytes"] = seq_split_bytes(placed_cache(sharded, policy))
        out[spec] = r
    return out


def decode_hlo(model: PiKVModel, spec: str) -> dict:
    """The collectives of `model`'s compiled decode program (the while loop of decode steps) at a
    cache of HLO_CAPACITY slots per layer (KIVI: HLO_CAPACITY quantized slots and its ring),
    compiled as `generate` compiles it."""
    capacity = HLO_CAPACITY + (8 if KIVI in spec else 0)
    policy = model.bind_policy(parse_method(spec, model=model, context_len=CONTEXT).policy)
    found, cache = eight_devices.decode_program_collectives(model, policy, prompts(), capacity, MAX_NEW)
    split = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(cache)
                if "seq" in jax.tree.leaves(tuple(x.sharding.spec)))
    step = [c for c in found if c["in_loop"]]
    largest = max(step, key=lambda c: c["largest_array"], default=None)
    return dict(count=len(step), max_bytes=largest["largest_array"] if largest else 0,
                step_bytes=sum(c["bytes"] for c in step), ops=sorted({c["op"] for c in step}),
                by_op=collective_summary(step)["by_op"],
                largest=largest and largest["line"][:300], capacity=max(cache.capacities()), split_elements=split)


def errors() -> dict:
    out = {}
    model = PiKVModel.from_config(config(), seed=0, mesh=mesh_from_spec("data=2,seq=4"))
    policy = parse_method("h2o@30t", model=model).policy  # 30 slots: seq=4 does not divide them
    try:
        model.generate(prompts(), MAX_NEW, policy=policy)
        out["seq_budget"] = None
    except ValueError as e:
        out["seq_budget"] = str(e)
    return out


def smollm2() -> dict:
    """SmolLM2 (3 KV heads: model=2 divides none, so attention and the cache's heads are replicated over
    `model` while its MLP and vocabulary split; slots split over `seq`) on model=2,seq=4 against one
    device: prompts of 100 and 80 tokens, 8 new tokens, H2O (evicting: the per-slot
scores, victims and writes all cross the split slot axis; the full cache is covered on the tiny model)."""
    single = PiKVModel.from_pretrained("smollm2")
    sharded = PiKVModel.from_pretrained("smollm2", mesh=mesh_from_spec("model=2,seq=4"))
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined movable metal type, oil-based ink and a screw press adapted from wine making. Within "
            "fifty years presses were working in more than two hundred European cities, and the price of books "
            "fell so far that ordinary merchants could own them. Scholars argue about how much of the "
            "Reformation, the scientific revolution and the rise of newspapers followed from this change. "
            "What is certain is that printed pages made it cheap to copy a text exactly, so that readers in "
            "distant towns could argue about the same words, and errors could be found and corrected.")
    ids = single.encode(text)[:100]
    out = {"prompt_tokens": len(ids)}
    for spec in ["h2o@0.5"]:
        policy = parse_method(spec, model=single).policy
        a = single.generate([ids, ids[:80]], 8, policy=policy)
        b = sharded.generate([ids, ids[:80]], 8, policy=policy)
        out[spec] = dict(equal=a.token_ids == b.token_ids, single=a.token_ids, sharded=b.token_ids,
                         evicted=a.stats["kept_tokens"] < a.stats["seen_tokens"], mesh=b.stats.get("mesh"),
                         cache_bytes=a.stats["cache_bytes"], per_device=b.stats["cache_bytes_per_device"])
    return out


def main():
    t0 = time.perf_counter()
    out = {"devices": jax.device_count()}
    if "--smollm2" in sys.argv:
        out["smollm2"] = smollm2()
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps(out))
        return
    single = PiKVModel.from_config(config(), seed=0)
    sharded = PiKVModel.from_config(config(), seed=0, mesh=mesh_from_spec("data=2,seq=4"))
    out["methods"] = compare(single, sharded, METHODS)
    out["methods_seconds"] = time.perf_counter() - t0
    second = PiKVModel.from_config(config(), seed=0, mesh=mesh_from_spec("model=2,seq=4"))
    out["model_seq"] = compare(single, second, SECOND_MESH_METHODS)
    t_hlo = time.perf_counter()
    out["hlo"] = {spec: decode_hlo(sharded, spec) for spec in HLO_METHODS}
    out["hlo_model_seq"] = {spec: decode_hlo(second, spec) for spec in SECOND_MESH_METHODS}
    out["hlo_seconds"] = time.perf_counter() - t_hlo
    out["errors"] = errors()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
