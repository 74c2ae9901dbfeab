"""`pikv generate` flags for mixture-of-experts models, kept here so cli.py only wires them in:

    add_moe_args(parser)                      # --router, --moe-capacity-factor, --moe-dropless
    model = apply_moe_args(args, model)       # a PiKVModel (rebuilt with the choices) or a ModelConfig

The router kind and the execution path are runtime choices, not checkpoint contents: applying them
to a loaded model rebuilds it from its own weights (router parameters the checkpoint lacks start at
zero, so every router first routes like the checkpoint's gate).
"""

from __future__ import annotations

import argparse
from typing import Any

from pikv_jax.api import PiKVModel
from pikv_jax.config import ModelConfig
from pikv_jax.models.weights import build_model, model_to_hf_weights
from pikv_jax.moe.routers import ROUTER_KINDS


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts (MoE models only)")
    g.add_argument("--router", default=None, choices=sorted(ROUTER_KINDS),
                   help="router of every MoE layer (default: the checkpoint's top-k gate, 'base')")
    g.add_argument("--moe-capacity-factor", type=float, default=None,
                   help="capacity dispatch with C = ceil(f * tokens * k / experts) slots per expert (drops counted)")
    g.add_argument("--moe-dropless", action="store_true",
                   help="dropless expert computation with ragged_dot (the default for MoE models)")


def moe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """ModelConfig fields the flags set (empty when no MoE flag was given)."""
    router = getattr(args, "router", None)
    cf = getattr(args, "moe_capacity_factor", None)
    dropless = bool(getattr(args, "moe_dropless", False))
    if cf is not None and dropless:
        raise ValueError("--moe-capacity-factor and --moe-dropless exclude each other; pick one")
    if cf is not None and not cf > 0:
        raise ValueError(f"--moe-capacity-factor must be > 0, got {cf}")
    out: dict[str, Any] = {}
    if router is not None:
        out["moe_router"] = router
    if cf is not None:
        out["moe_capacity_factor"] = float(cf)
    if dropless:
        out["moe_capacity_factor"] = None
    return out


def apply_moe_args(args: argparse.Namespace, target):
    """Applies the MoE flags to a ModelConfig (returns a new config) or to a loaded PiKVModel (returns
    a PiKVModel rebuilt from the same weights). Without MoE flags the target comes back unchanged;
    MoE flags on a dense model raise ValueError."""
    overrides = moe_overrides(args)
    if not overrides:
        return target
    cfg = target if isinstance(target, ModelConfig) else target.config
    if cfg.num_experts < 1:
        flags = ", ".join("--" + k.replace("moe_router", "router").replace("_", "-") for k in overrides)
        raise ValueError(f"{flags} only apply to mixture-of-experts models; this model "
                         f"(architecture {cfg.architecture!r}) is dense")
    new_cfg = cfg.replace(**overrides)
    if isinstance(target, ModelConfig):
        return new_cfg
    return rebuild_with_config(target, new_cfg)


def rebuild_with_config(pikv_model, cfg: ModelConfig):
    """A PiKVModel with `cfg` (same shapes, other runtime MoE choices) and the model's own weights."""
    weights = model_to_hf_weights(pikv_model.model)
    model = build_model(cfg, weights, dtype=pikv_model.model.dtype, source=getattr(pikv_model, "name", "model"))
    return PiKVModel(model, pikv_model.tokenizer, cfg, cache_dtype=pikv_model.cache_dtype,
                     policy=pikv_model.policy, name=pikv_model.name, mesh=pikv_model.mesh)


__all__ = ["add_moe_args", "apply_moe_args", "moe_overrides", "rebuild_with_config"]
