"""Checks of expert-parallel MoE generation that need 8 CPU devices; run by
test_moe_sharded_generate.py in a subprocess whose XLA_FLAGS give it 8 devices. Prints one JSON line.

For a tiny random Mixtral-shaped model (8 experts, top-2, GQA 8/4 heads) on meshes with an `expert`
axis it measures:
- greedy ids of sharded and single-device generation for full, h2o and int4 KIVI;
- one MoE block of a Qwen2-MoE-shaped model (shared expert, capacity dispatch that drops) on both
  paths: output, drops and per-expert loads;
- the expert weights' PartitionSpecs and their bytes per device, from the arrays' shards;
- the collectives of the compiled decode program (sharded_generate_checks.decode_hlo) and the
  all-reduces over `expert` alone, which are the expert layer's (one [B/data, H] psum per layer).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sharded_generate_checks import CONTEXT, MAX_NEW, decode_collectives, hlo_summary, prompts

from pikv_jax.api import PiKVModel
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method
from pikv_jax.models.moe_llama import moe_layers
from pikv_jax.moe.expert_parallel import ExpertParallel
from pikv_jax.parallel import mesh_from_spec
from pikv_jax.runtime import sharding as ms

KIVI = "int4(group_size=8,residual_length=16)"
METHODS = ["full", "h2o@0.5", KIVI]
MESHES = ["data=2,expert=4", "data=2,model=2,expert=2"]
NUM_LAYERS = 2


def mixtral(**overrides):
    kw = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=128, intermediate_size=64, vocab_size=128,
              num_hidden_layers=NUM_LAYERS, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    return tiny_config("mixtral", **{**kw, **overrides})


def qwen_moe():
    """Qwen2-MoE shaped: softmax then top-2 over 8 experts, a gated shared expert, q/k/v bias, and
    capacity dispatch at factor 1 (decode's 4 tokens get 1 slot per expert: assignments drop)."""
    return tiny_config("qwen2_moe", num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                       intermediate_size=64, vocab_size=128, num_hidden_layers=NUM_LAYERS, num_experts=8,
                       num_experts_per_tok=2, shared_expert_intermediate_size=32, norm_topk_prob=False,
                       moe_capacity_factor=1.0, max_position_embeddings=512)


def expert_params(model: PiKVModel) -> list[jax.Array]:
    return [v.get_value() for p, v in nnx.to_flat_state(model.params) if "experts" in map(str, p)]


def generate_all(model: PiKVModel, specs, reference: PiKVModel | None = None) -> dict:
    """{spec: GenerationOutput}; policies are built on `reference` (default: `model`)."""
    out = {}
    for spec in specs:
        policy = parse_method(spec, model=reference or model, context_len=CONTEXT).policy
        out[spec] = model.generate(prompts(), MAX_NEW, policy=policy)
    return out


def compare(single: dict, sharded: dict) -> dict:
    return {spec: dict(equal=a.token_ids == sharded[spec].token_ids, single=a.token_ids,
                       sharded=sharded[spec].token_ids, finish_equal=a.finish_reasons == sharded[spec].finish_reasons,
                       evicted=a.stats["kept_tokens"] < a.stats["seen_tokens"]) for spec, a in single.items()}


def expert_collectives(model: PiKVModel) -> dict:
    """The decode program's collectives, and those over the `expert` axis alone (the MoE psum)."""
    found, capacity = decode_collectives(model, "full")
    r = hlo_summary(found, capacity)
    step = [c for c in found if c["in_loop"]]
    expert = [c for c in step if "{'expert'}" in c["line"]]
    r["step_bytes"] = sum(c["bytes"] for c in step)
    r["expert_ops"] = sorted({c["op"] for c in expert})
    r["expert_count"] = len(expert)
    r["expert_bytes"] = sum(c["bytes"] for c in expert)
    r["expert_arrays"] = sorted({c["largest_array"] for c in expert})
    r.pop("largest", None)
    return r


def errors() -> dict:
    """An `expert` axis that does not divide the experts: a one-line error from the placement check;
    and building a model whose 6 experts expert=4 does not divide is the same kind of error."""
    out = {}
    try:
        ExpertParallel(mesh_from_spec("data=2,expert=4")).check(6)
    except ValueError as e:
        out["indivisible"] = str(e)
    try:
        PiKVModel.from_config(mixtral(num_experts=6), seed=0, mesh=mesh_from_spec("data=2,expert=4"))
        out["indivisible_model"] = None
    except ValueError as e:
        out["indivisible_model"] = str(e)
    return out


def main():
    t0 = time.perf_counter()
    out = {"devices": jax.device_count(), "meshes": {}}
    single = PiKVModel.from_config(mixtral(), seed=0)
    reference = generate_all(single, METHODS)
    weights = expert_params(single)
    out["expert_bytes"] = sum(w.nbytes for w in weights)
    out["one_expert_bytes"] = min(w.nbytes for w in weights) // single.config.num_experts
    for spec in MESHES:
        mesh = mesh_from_spec(spec)
        sharded = PiKVModel.from_config(mixtral(), seed=0, mesh=mesh)
        placed = expert_params(sharded)
        t1 = time.perf_counter()
        r = dict(mesh=ms.mesh_summary(mesh), methods=compare(reference, generate_all(sharded, METHODS, single)))
        r["generate_seconds"] = round(time.perf_counter() - t1, 2)
        r["expert_specs"] = sorted({str(w.sharding.spec) for w in placed})
        r["expert_bytes_per_device"] = ms.bytes_per_device(placed)
        r["parallel_layers"] = sum(m.expert_parallel is not None for m in moe_layers(sharded.model))
        r["hlo"] = expert_collectives(sharded)
        out["meshes"][spec] = r

    # capacity dispatch with drops and a shared expert: one MoE block on 16 tokens (2 slots per
    # expert), jitted alone, drops the same assignments and gives the same output on both paths
    q_single = PiKVModel.from_config(qwen_moe(), seed=2)
    q_sharded = PiKVModel.from_config(qwen_moe(), seed=2, mesh=mesh_from_spec("data=2,expert=4"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 128)), jnp.float32)
    block = nnx.jit(lambda m, x: m(x))
    a, b = moe_layers(q_single.model)[0], moe_layers(q_sharded.model)[0]
    ya, yb = np.asarray(block(a, x)), np.asarray(block(b, x))
    sa, sb = a.get_stats(), b.get_stats()
    # the expert-parallel sum (psum over devices) adds in another order: 1e-6-level differences, while a
    # different drop changes a token's output by O(1)
    out["qwen_capacity"] = dict(block_close=bool(np.allclose(ya, yb, rtol=1e-5, atol=1e-5)),
                                block_max_diff=float(np.abs(ya - yb).max()),
                                dropped=[sa["dropped"], sb["dropped"]], parallel=b.expert_parallel is not None,
                                processed_equal=sa["processed_per_expert"] == sb["processed_per_expert"])
    out["errors"] = errors()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
