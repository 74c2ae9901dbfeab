"""The router family: one file per routing algorithm, all built by `create_moe_router`."""

from __future__ import annotations

import inspect

from flax import nnx

from pikv_jax.moe.routers.adaptive import AdaptiveRouter
from pikv_jax.moe.routers.balanced import TopKBalancedRouter
from pikv_jax.moe.routers.base import (
    GATINGS,
    BaseRouter,
    RouterExtraParam,
    RouterState,
    Routing,
    TopKRouter,
    top_k_gating,
)
from pikv_jax.moe.routers.eplb import EPLBRouter, ExpertBias, ExpertLoad, eplb_bias_update
from pikv_jax.moe.routers.fast import FastMoERouter
from pikv_jax.moe.routers.flex import FlexMoERouter
from pikv_jax.moe.routers.hierarchical import HierarchicalRouter
from pikv_jax.moe.routers.mixture import MixtureOfExpertsRouter
from pikv_jax.moe.routers.pikv import PiKVRouter, affinity_from_counts
from pikv_jax.moe.routers.sinkhorn import SinkhornRouter, sinkhorn_log
from pikv_jax.moe.routers.time_moe import TimeMoERouter, time_features

ROUTERS: dict[str, type[BaseRouter]] = {
    "base": BaseRouter,
    "topk_balanced": TopKBalancedRouter,
    "adaptive": AdaptiveRouter,
    "eplb": EPLBRouter,
    "hierarchical": HierarchicalRouter,
    "sinkhorn": SinkhornRouter,
    "flex": FlexMoERouter,
    "time": TimeMoERouter,
    "fast": FastMoERouter,
    "mixture": MixtureOfExpertsRouter,
    "pikv": PiKVRouter,
}
ALIASES = {"topk": "base", "balanced": "topk_balanced", "cache_aware": "pikv"}
ROUTER_KINDS = tuple(ROUTERS) + tuple(ALIASES)


def _allowed_kwargs(cls) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if klass is nnx.Module or not issubclass(klass, BaseRouter):
            continue
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if p.kind is p.KEYWORD_ONLY:
                names.add(name)
    return names


def create_moe_router(kind: str, hidden_size: int, num_experts: int, top_k: int = 2, *,
                      rngs: nnx.Rngs | None = None, seed: int = 0, **kw) -> BaseRouter:
    """Builds a router by name. `kind` in ROUTER_KINDS; `**kw` are the router's keyword options.

    A call of the result returns (dispatch f32[T, E, C], combine f32[T, E, C], probs f32[T, E],
    aux_loss f32[]); `router.route(x)` returns the `Routing` itself and `router.plan(x)` both.
    """
    name = ALIASES.get(kind, kind)
    if name not in ROUTERS:
        raise ValueError(f"unknown router kind {kind!r}; allowed: {sorted(ROUTER_KINDS)}")
    cls = ROUTERS[name]
    unknown = sorted(set(kw) - _allowed_kwargs(cls))
    if unknown:
        raise ValueError(f"router {name!r} does not take {unknown}; allowed options: {sorted(_allowed_kwargs(cls))}")
    return cls(hidden_size, num_experts, top_k, rngs=rngs if rngs is not None else nnx.Rngs(seed), **kw)


__all__ = ["ALIASES", "AdaptiveRouter", "BaseRouter", "EPLBRouter", "ExpertBias", "ExpertLoad", "FastMoERouter",
           "FlexMoERouter", "GATINGS", "HierarchicalRouter", "MixtureOfExpertsRouter", "PiKVRouter", "ROUTERS",
           "ROUTER_KINDS", "RouterExtraParam", "RouterState", "Routing", "SinkhornRouter", "TimeMoERouter",
           "TopKBalancedRouter", "TopKRouter", "affinity_from_counts", "create_moe_router", "eplb_bias_update",
           "sinkhorn_log", "time_features", "top_k_gating"]
