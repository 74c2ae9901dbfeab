"""pikv-jax: KV-cache management for JAX/Flax LLM inference (a JAX reimplementation of PiKV)."""

from pikv_jax.api import GenerationOutput, PiKVModel
from pikv_jax.cache.policies.base import CachePolicy, FullCache
from pikv_jax.cache.state import KVCache, LayerCache, init_cache
from pikv_jax.config import ModelConfig, RopeScaling, preset
from pikv_jax.sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "FullCache", "GenerationOutput", "KVCache", "LayerCache", "ModelConfig", "PiKVModel",
    "RopeScaling", "SamplingConfig", "init_cache", "preset",
]
