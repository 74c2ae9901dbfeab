"""PiKV's usage guide (../shared/seed, "PiKV使用指南"), snippet by snippet, on pikv-jax.

Each function below is one snippet of the guide, in the guide's order, with pikv-jax's names and
JAX arrays. Sizes the guide reads from a global `config` are passed explicitly; otherwise the call
shapes and return shapes are the guide's: positional extra router inputs, tuple unpacking of a
compressor's result, per-layer [B, heads, S, head_dim] keys wherever a `hidden_size` is given, a
`DistributedPiKVMoE` without a mesh, every `SchedulingPolicy`, a numeric hit rate.

Where the guide's own code is wrong, this does what it means, and says so:
- the integration class runs PiKVMoE on the cached keys and values (an MoE layer transforms
  hidden states, not K/V) and never feeds the processed cache back into the model. Here the cache
  policy and compression run inside the jitted generation loop (`PiKVModel.generate`), and the
  MoE layer runs on the model's hidden states, whose routing statistics `get_stats()` reports.

Run: `python examples/seed_guide.py` (about a minute on a 2-core CPU; the last snippet loads the
bundled SmolLM2-135M).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax import PiKVModel
from pikv_jax.cache.policies import make_policy
from pikv_jax.compress import (
    FastVCompressor,
    LoRACompressor,
    PiKVCompressor,
    PyramidCompressor,
    QuantizedCompressor,
    SVDCompressor,
)
from pikv_jax.moe import DistributedPiKVMoE, PiKVMoE, create_moe_router
from pikv_jax.runtime import forward
from pikv_jax.scheduling import CacheSchedulingManager, H2OScheduler, LRUScheduler, QUESTScheduler, SchedulingPolicy

# the guide's global config, passed explicitly below
CONFIG = {"hidden_size": 1024, "num_experts": 8}
KEY = jax.random.key(0)


def randn(*shape, seed: int = 0):
    return jax.random.normal(jax.random.fold_in(KEY, seed), shape, jnp.float32)


# ------------------------------------------------------------------------------------- PiKV MoE


def snippet_pikv_moe():
    """Basic and distributed PiKVMoE, and `process_with_pikv`."""
    h = CONFIG["hidden_size"]
    pikv_moe = PiKVMoE(hidden_size=h, num_experts=CONFIG["num_experts"], rank=4, alpha=1.0,
                       use_distillation=True, teacher_hidden_size=h * 2)
    distributed_pikv = DistributedPiKVMoE(hidden_size=h, num_experts=CONFIG["num_experts"], rank=4, alpha=1.0,
                                          use_distillation=True, capacity_factor=4.0)

    def process_with_pikv(input_tensor):
        output = pikv_moe(input_tensor)
        return output

    x = randn(4, 128, h)
    out = process_with_pikv(x)
    dist_out = distributed_pikv(x)
    stats = pikv_moe.get_stats()
    print(f"  PiKVMoE {tuple(x.shape)} -> {tuple(out.shape)}; expert load {np.round(stats['expert_load'], 3)}; "
          f"DistributedPiKVMoE over a {dict(distributed_pikv.mesh.shape)} mesh -> {tuple(dist_out.shape)}")
    return pikv_moe


def snippet_moe_strategies():
    """create_moe_router for flex / time / fast / mixture, and `process_with_moe_strategies`."""
    routers = {
        "flex": create_moe_router("flex", hidden_size=1024, num_experts=16, top_k=4),
        "time": create_moe_router("time", hidden_size=1024, num_experts=8, top_k=2),
        "fast": create_moe_router("fast", hidden_size=1024, num_experts=16, top_k=2),
        "mixture": create_moe_router("mixture", hidden_size=1024, num_experts=8, top_k=2),
    }

    def process_with_moe_strategies(input_tensor, strategy_type="flex"):
        router = create_moe_router(strategy_type, hidden_size=1024, num_experts=8)
        if strategy_type == "flex":
            modality_info = {"image": randn(4, 128, 1024, seed=1), "genomic": randn(4, 128, 1024, seed=2)}
            dispatch, combine, probs, loss = router(input_tensor, modality_info)
        elif strategy_type == "time":
            time_info = {"timestamps": jnp.arange(128, dtype=jnp.float32),
                         "seasonality": jnp.sin(jnp.arange(128) * 2 * jnp.pi / 24)}
            dispatch, combine, probs, loss = router(input_tensor, time_info)
        else:
            dispatch, combine, probs, loss = router(input_tensor)
        return dispatch, combine, probs, loss

    x = randn(4, 128, 1024, seed=3)
    for name in routers:
        dispatch, combine, probs, loss = process_with_moe_strategies(x, name)
        print(f"  router {name:8s} dispatch {tuple(dispatch.shape)} probs {tuple(probs.shape)} "
              f"aux loss {float(loss):.4f}")


# ------------------------------------------------------------------------------------- compression


def snippet_compression():
    """PiKVCompressor, LoRACompressor, PyramidCompressor and `compress_kv_cache`."""
    compressor = PiKVCompressor(hidden_size=1024, compression_methods=["lora", "pyramid", "fastv"],
                                importance_threshold=0.5, adaptive_selection=True)
    lora_compressor = LoRACompressor(hidden_size=1024, rank=64, alpha=1.0, dropout=0.1)
    pyramid_compressor = PyramidCompressor(hidden_size=1024, compression_ratio=0.5, num_levels=3, decay_factor=0.8)

    def compress_kv_cache(keys, values, importance=None):
        compressed_keys, compressed_values = compressor(keys, values, importance)
        stats = compressor.get_compression_stats()
        print(f"  PiKVCompressor compression ratio: {stats['compression_ratio']:.2f} "
              f"(vs bf16: {stats['compression_ratio_vs_bf16']:.2f})")
        return compressed_keys, compressed_values

    keys, values = randn(2, 256, 1024, seed=4), randn(2, 256, 1024, seed=5)
    importance = jax.nn.sigmoid(randn(2, 256, seed=6))
    ck, cv = compress_kv_cache(keys, values, importance)
    # per-layer keys as a model gives them, [B, heads, S, head_dim] with heads * head_dim = hidden_size
    layer_keys, layer_values = randn(2, 16, 256, 64, seed=7), randn(2, 16, 256, 64, seed=8)
    for name, c in (("LoRA", lora_compressor), ("Pyramid", pyramid_compressor),
                    ("FastV", FastVCompressor(hidden_size=1024)), ("SVD", SVDCompressor(rank=16)),
                    ("int4", QuantizedCompressor(bits=4))):
        k2, v2 = c(layer_keys, layer_values, importance)
        ratio = c.get_compression_stats()["compression_ratio"]
        print(f"  {name:8s} {tuple(layer_keys.shape)} -> {tuple(k2.shape)}; compression ratio {ratio:.2f}")
    return ck, cv


# ------------------------------------------------------------------------------------- scheduling


def snippet_scheduling():
    """CacheSchedulingManager, H2OScheduler and `manage_cache`, plus every SchedulingPolicy."""
    cache_manager = CacheSchedulingManager(cache_size=4096, hidden_size=1024, policy=SchedulingPolicy.LRU)
    h2o_scheduler = H2OScheduler(cache_size=4096, hidden_size=1024, heavy_ratio=0.1, recent_ratio=0.1)

    def manage_cache(manager, keys, values, metadata=None):
        manager.update_cache(keys, values, metadata)
        stats = manager.get_cache_stats()
        print(f"  {type(manager).__name__:24s} {stats['policy']:14s} hit rate: {stats['hit_rate']:.2f}")
        cached_keys, cached_values = manager.get_cached_data()
        return cached_keys, cached_values

    keys, values = randn(1, 512, 1024, seed=9), randn(1, 512, 1024, seed=10)
    for manager in (cache_manager, h2o_scheduler, LRUScheduler(cache_size=256, hidden_size=1024),
                    QUESTScheduler(cache_size=256, hidden_size=1024)):
        manage_cache(manager, keys, values, {"layer_idx": 0})
    for policy in SchedulingPolicy:
        m = CacheSchedulingManager(cache_size=128, hidden_size=1024, policy=policy)
        manage_cache(m, keys[:, :256], values[:, :256])


# ------------------------------------------------------------------------------------- integration


class PiKVEnhancedModel:
    """The guide's integration class on pikv-jax: a Hugging Face-architecture model (the bundled
    SmolLM2-135M instead of Qwen-7B), an MoE layer, a compressor and a cache scheduler.

    What the guide means, not what its loop does: the compressor and an eviction policy run inside
    the jitted decode loop (`PiKVModel.generate(policy=...)`), so the compressed cache is the one the
    model attends over. The guide's per-layer scheduling is kept: each layer's keys and values
    ([B, heads, S, head_dim], as a model gives them) and queries go through a scheduler of that
    layer, whose hit rate measures how much of the queries' attention the scheduled cache keeps.
    The MoE layer runs on the model's last hidden states (not on K/V).
    """

    def __init__(self, model_name: str = "smollm2", max_length: int = 1024, cache_size: int = 32):
        self.model = PiKVModel.from_pretrained(model_name)
        self.tokenizer = self.model.tokenizer
        self.max_length = max_length
        cfg = self.model.config
        self.hidden_size = cfg.hidden_size
        self.pikv_moe = PiKVMoE(hidden_size=self.hidden_size, num_experts=4, rank=4, alpha=1.0,
                                use_distillation=True, teacher_hidden_size=self.hidden_size * 2)
        self.compressor = QuantizedCompressor(bits=4)
        self.policy = self.compressor.as_policy(make_policy("h2o", budget_ratio=0.5))
        kv_width = cfg.num_key_value_heads * cfg.dim_per_head  # the scheduler sees per-layer K/V
        self.cache_managers = [CacheSchedulingManager(cache_size=cache_size, hidden_size=kv_width,
                                                      num_kv_heads=cfg.num_key_value_heads,
                                                      num_heads=cfg.num_attention_heads, policy=SchedulingPolicy.LRU)
                               for _ in range(cfg.num_hidden_layers)]

    def generate(self, prompt: str, max_new_tokens: int = 50) -> str:
        out = self.model.generate([prompt], max_new_tokens=max_new_tokens, policy=self.policy)
        ids = self.model.encode(prompt) + out.token_ids[0]
        layers = self.model.capture_qkv([ids], max_tokens=self.max_length)
        for layer_idx, (manager, qkv) in enumerate(zip(self.cache_managers, layers)):
            b, s, h, d = qkv.q.shape
            manager.update_cache(qkv.k, qkv.v, metadata={"layer_idx": layer_idx,
                                                         "queries": qkv.q.reshape(b, s, h * d)})
        tokens = jnp.asarray([ids], jnp.int32)
        _, hidden = forward.forward_full(nnx.merge(self.model.graphdef, self.model.params), tokens,
                                         jnp.asarray([len(ids)], jnp.int32), return_hidden=True)
        self.pikv_moe(hidden[-1])
        return out.texts[0]

    def get_stats(self):
        gen = self.model.get_stats()
        cache = [m.get_cache_stats() for m in self.cache_managers]
        return {
            "compression_stats": dict(gen, compression_ratio=gen["full_cache_bytes"] / gen["cache_bytes"]),
            "cache_stats": {"hit_rate": float(np.mean([c["hit_rate"] for c in cache])), "per_layer": cache},
            "moe_stats": self.pikv_moe.get_stats(),
        }


def snippet_integration():
    """The integration class and its `main()`."""
    model = PiKVEnhancedModel(model_name="smollm2")
    prompt = "Give a short history of artificial intelligence."
    generated_text = model.generate(prompt, max_new_tokens=24)
    print(f"  generated: {generated_text!r}")
    stats = model.get_stats()
    print(f"  compression ratio (bf16 bytes of the tokens / bytes the cache allocates): "
          f"{stats['compression_stats']['compression_ratio']:.2f}")
    print(f"  cache hit rate (mean over layers): {stats['cache_stats']['hit_rate']:.2f}")
    print(f"  moe expert load: {np.round(stats['moe_stats']['expert_load'], 3)}")


def main():
    start = time.perf_counter()
    for snippet in (snippet_pikv_moe, snippet_moe_strategies, snippet_compression, snippet_scheduling,
                    snippet_integration):
        print(f"{snippet.__name__}: {snippet.__doc__.splitlines()[0] if snippet.__doc__ else ''}")
        snippet()
    print(f"all snippets ran in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
