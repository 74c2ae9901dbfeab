"""Mixture of experts: the router family, PiKVMoE (sparse MoE with LoRA experts), the expert-sharded
KV cache, and expert parallelism over a device mesh (`DistributedPiKVMoE`)."""

from pikv_jax.moe.dispatch import (
                                   CapacityDispatch,
                                   SortedDispatch,
                                   capacity_dispatch,
                                   expert_capacity,
                                   sort_by_expert,
                                   unsort_and_combine,
)
from pikv_jax.moe.distill import SeedOptimizer, distillation_step
from pikv_jax.moe.distributed import DistributedPiKVMoE
from pikv_jax.moe.expert_cache import ExpertShardedKVCache, init_expert_sharded_cache
from pikv_jax.moe.experts import Experts, LoRAParam, SharedExpert
from pikv_jax.moe.pikv_moe import MoEAux, MoEStats, PiKVMoE
from pikv_jax.moe.routers import (
                                   ROUTER_KINDS,
                                   ROUTERS,
                                   AdaptiveRouter,
                                   BaseRouter,
                                   EPLBRouter,
                                   ExpertBias,
                                   ExpertLoad,
                                   FastMoERouter,
                                   FlexMoERouter,
                                   HierarchicalRouter,
                                   MixtureOfExpertsRouter,
                                   PiKVRouter,
                                   RouterExtraParam,
                                   RouterState,
                                   Routing,
                                   SinkhornRouter,
                                   TimeMoERouter,
                                   TopKBalancedRouter,
                                   TopKRouter,
                                   create_moe_router,
)

__all__ = [
    "AdaptiveRouter", "BaseRouter", "CapacityDispatch", "DistributedPiKVMoE", "EPLBRouter", "ExpertBias",
    "ExpertLoad", "ExpertShardedKVCache", "Experts", "FastMoERouter", "FlexMoERouter", "HierarchicalRouter",
    "LoRAParam", "MixtureOfExpertsRouter", "MoEAux", "MoEStats", "PiKVMoE", "PiKVRouter", "ROUTERS",
    "ROUTER_KINDS", "RouterExtraParam", "RouterState", "Routing", "SharedExpert", "SinkhornRouter",
    "SeedOptimizer", "SortedDispatch", "TimeMoERouter", "TopKBalancedRouter", "TopKRouter", "capacity_dispatch",
    "create_moe_router", "distillation_step", "expert_capacity", "init_expert_sharded_cache", "sort_by_expert",
    "unsort_and_combine",
]
