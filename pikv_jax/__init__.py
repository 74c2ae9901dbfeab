"""pikv-jax: KV-cache management for JAX/Flax LLM inference (a JAX reimplementation of PiKV)."""

from pikv_jax.api import GenerationOutput, PiKVModel
from pikv_jax.cache.policies import make_policy
from pikv_jax.cache.policies.base import CachePolicy, FullCache
from pikv_jax.cache.state import KVCache, LayerCache, init_cache
from pikv_jax.config import ModelConfig, RopeScaling, preset
from pikv_jax.moe import DistributedPiKVMoE, PiKVMoE, create_moe_router
from pikv_jax.sampling import SamplingConfig
from pikv_jax.scheduling import (
                                    CacheSchedulingManager,
                                    DuoAttentionScheduler,
                                    H2OScheduler,
                                    LRUScheduler,
                                    QUESTScheduler,
                                    SchedulingPolicy,
                                    StreamingLLMScheduler,
)

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "CacheSchedulingManager", "DistributedPiKVMoE", "DuoAttentionScheduler", "FullCache",
    "GenerationOutput", "H2OScheduler", "KVCache", "LRUScheduler", "LayerCache", "ModelConfig", "PiKVModel", "PiKVMoE",
    "QUESTScheduler", "RopeScaling", "SamplingConfig", "SchedulingPolicy", "StreamingLLMScheduler", "create_moe_router",
    "init_cache", "make_policy", "preset",
]
