"""The MoE decoder variant: Mixtral, Qwen2-MoE and Qwen3-MoE shaped layers.

A decoder layer of an MoE config (`cfg.num_experts > 0`) has the dense model's attention and norms
and a `PiKVMoE` as its `mlp` (called as `layer.mlp(x)`, so `models/forward.py` runs unchanged and
every cache policy works in MoE generation). Architecture details:

- Mixtral: gate = Linear(H, E); top-k of the logits, softmax over the k (= softmax, top-k,
  renormalise); experts w1 (gate), w3 (up), w2 (down); no shared expert.
- Qwen2-MoE: softmax over E, top-k, renormalised only when `norm_topk_prob`; a shared expert
  (SwiGLU of width shared_expert_intermediate_size) gated by sigmoid(x @ w_shared_gate); q/k/v bias.
- Qwen3-MoE: as Qwen2-MoE without the shared expert, with q/k RMSNorm.

The router kind (`cfg.moe_router`) and the execution path (`cfg.moe_capacity_factor`: None =
dropless ragged_dot, as Hugging Face computes it; a number = capacity dispatch) are runtime choices.

Checkpoint names (`moe_hf_sources`): the NNX path `layers.{i}.mlp.router.gate.kernel` is
`model.layers.{i}.block_sparse_moe.gate.weight` (Mixtral) or `model.layers.{i}.mlp.gate.weight`
(Qwen); the stacked `layers.{i}.mlp.experts.{gate,up,down}_proj` [E, ...] gathers the per-expert
tensors `...experts.{e}.{w1,w3,w2 | gate_proj,up_proj,down_proj}.weight`; the shared expert keeps
its HF names. Router parameters without a checkpoint counterpart start at zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pikv_jax.config import ModelConfig
from pikv_jax.moe.expert_parallel import ExpertParallel
from pikv_jax.moe.experts import PROJECTIONS
from pikv_jax.moe.pikv_moe import PiKVMoE

MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def moe_mlp(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs) -> PiKVMoE:
    """The sparse MoE block of one decoder layer of `cfg`."""
    if cfg.num_experts < 1:
        raise ValueError("moe_mlp needs a config with num_experts >= 1")
    router_kw = dict(load_balance_coef=cfg.router_aux_loss_coef, z_loss_coef=0.0,
                     gating="topk_softmax" if cfg.architecture == "mixtral" else "softmax_topk",
                     normalize_topk=cfg.norm_topk_prob)
    return PiKVMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, rank=0, router=cfg.moe_router,
                   intermediate_size=cfg.expert_intermediate_size, capacity_factor=cfg.moe_capacity_factor,
                   dropless=cfg.moe_capacity_factor is None, shared_expert_size=cfg.shared_expert_intermediate_size,
                   router_kwargs=router_kw, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def moe_hf_sources(cfg: ModelConfig, path: tuple) -> tuple[list[str], bool, bool] | None:
    """HF tensor names of an MoE parameter: (names, transpose, stacked over experts), or None when the
    path is not inside an MoE block (the dense naming applies). names == [] marks a parameter that
    checkpoints do not have (router extras, LoRA adapters): it starts at zero."""
    parts = [str(p) for p in path]
    if len(parts) < 5 or parts[0] != "layers" or parts[2] != "mlp":
        return None
    block = f"model.layers.{parts[1]}." + ("block_sparse_moe" if cfg.architecture == "mixtral" else "mlp")
    rest = parts[3:]
    if rest[0] == "router":
        return ([f"{block}.gate.weight"], True, False) if rest == ["router", "gate", "kernel"] else ([], False, False)
    if rest[0] == "experts":
        if len(rest) == 2 and rest[1] in PROJECTIONS:
            hf = MIXTRAL_EXPERT_NAMES[rest[1]] if cfg.architecture == "mixtral" else rest[1]
            return [f"{block}.experts.{e}.{hf}.weight" for e in range(cfg.num_experts)], True, True
        return [], False, False
    return None  # shared_expert.*, shared_expert_gate: HF names follow the module path


def moe_layers(model) -> list[PiKVMoE]:
    """The MoE blocks of a CausalLM (empty for a dense model)."""
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, PiKVMoE)]


def shard_moe_layers(model, mesh, *, expert_axis: str = "expert") -> int:
    """Makes every MoE block of `model` run expert-parallel over `mesh`'s `expert_axis` (call before
    `nnx.split`: the placement is static, part of the graph definition) when that axis is larger
    than 1 and divides the experts, which is when the parameter rules split the expert weights over
    it; otherwise the blocks keep one device's path. Returns the number of blocks made parallel."""
    size = 1 if mesh is None else int(dict(mesh.shape).get(expert_axis, 1))
    n = 0
    for m in moe_layers(model):
        parallel = size > 1 and m.num_experts % size == 0
        m.shard_experts(ExpertParallel(mesh, expert_axis=expert_axis) if parallel else None)
        n += parallel
    return n


def moe_stats(model) -> list[dict]:
    """Per-layer host-side routing statistics of the model's last forward (eager or under nnx.jit)."""
    return [m.get_stats() for m in moe_layers(model)]


def moe_aux_loss(model):
    """Sum over layers of the auxiliary router loss of the last forward (traceable; 0 for dense models).

    Use right after a forward inside the same traced function (e.g. a training step under nnx.jit
    or a function that merges the model inside jit)."""
    total = jnp.float32(0.0)
    for m in moe_layers(model):
        s = m.stats.get_value()
        if s is None:
            raise ValueError("moe_aux_loss: run a forward pass of the model first")
        total = total + s["aux_loss"]
    return total


__all__ = ["moe_aux_loss", "moe_hf_sources", "moe_layers", "moe_mlp", "moe_stats", "shard_moe_layers"]
