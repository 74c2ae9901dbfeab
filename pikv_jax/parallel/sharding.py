"""One place for sharding rules: which mesh axis each parameter and activation is split over.

`PARAM_RULES` maps parameter paths (dotted NNX paths such as "layers.3.self_attn.q_proj.kernel")
to one mesh axis name (or None) per array axis:

- attention, Megatron style: q/k/v projections column-split over `model` on their head axis, the
  output projection row-split, so each device holds whole KV heads with their query-head groups and
  one all-reduce of [B, T, E] per layer joins the heads. The split unit is the KV head: when the
  `model` axis does not divide the KV heads the whole attention block is replicated over `model`
  (splitting only the query heads would turn every per-slot score of the GQA group, as H2O and TOVA
  read it, into a capacity-sized all-reduce at each step);
- MLP: gate/up column-split, down row-split over `model` (one all-reduce of [B, T, E]);
- embeddings and an untied LM head: split over `model` on the vocabulary axis. The table is the
  largest single parameter (vocab x hidden), and what crosses devices is activation-sized: the
  lookup all-reduces [B, T, E] and the head's logits [B, V] are gathered for sampling;
- MoE: stacked expert weights [E, ...] (and their LoRA factors) over `expert`; routers and shared
  experts replicated;
- everything else (norms, output biases, q/k norms) replicated.

A split happens only when the mesh has the axis and its size divides the rule's group count (KV
heads, MLP hidden units, vocabulary, experts; the array dimension when no count is given);
otherwise that array axis is replicated, never an error. Every parameter is replicated over `data`.
Tokens of the expert-parallel MoE layer are split over every mesh axis at once (data x expert).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, MODEL_AXIS

EXPERT_PARAM_OWNER = "experts"  # stacked expert weights live under a submodule of this name


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """Parameters whose dotted path matches `pattern` (re.search) and that have at least `min_ndim`
    axes get `axes`: one logical mesh axis (or None) per leading array axis, the rest replicated.
    `group` names the count (see `split_counts`) the mesh axis size must divide."""

    pattern: str
    axes: tuple[str | None, ...]
    group: str | None = None
    min_ndim: int = 0


# First match wins; a parameter matching no rule is replicated.
PARAM_RULES: tuple[ParamRule, ...] = (
    ParamRule(rf"(^|\.){EXPERT_PARAM_OWNER}\.", (EXPERT_AXIS,), group="experts", min_ndim=3),
    ParamRule(r"(^|\.)self_attn\.[qkv]_proj\.kernel$", (None, MODEL_AXIS), group="kv_heads"),  # [E, H*D]
    ParamRule(r"(^|\.)self_attn\.[qkv]_proj\.bias$", (MODEL_AXIS,), group="kv_heads"),  # [H*D]
    ParamRule(r"(^|\.)self_attn\.o_proj\.kernel$", (MODEL_AXIS, None), group="kv_heads"),  # [H*D, E]
    ParamRule(r"(^|\.)mlp\.(gate|up)_proj\.kernel$", (None, MODEL_AXIS), group="mlp_hidden"),  # [E, I]
    ParamRule(r"(^|\.)mlp\.down_proj\.kernel$", (MODEL_AXIS, None), group="mlp_hidden"),  # [I, E]
    ParamRule(r"(^|\.)embed_tokens\.embedding$", (MODEL_AXIS, None), group="vocab"),  # [V, E]
    ParamRule(r"(^|\.)lm_head\.kernel$", (None, MODEL_AXIS), group="vocab"),  # [E, V]
)


def split_counts(*, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                 vocab_size: int | None = None, num_experts: int | None = None) -> dict[str, int]:
    """The group counts of `PARAM_RULES` for one model (absent ones fall back to array dimensions)."""
    counts = dict(kv_heads=num_kv_heads, mlp_hidden=intermediate_size, vocab=vocab_size, experts=num_experts)
    return {k: int(v) for k, v in counts.items() if v}


def param_spec(path: tuple, value, *, axis_sizes: Mapping[str, int] | None = None,
               counts: Mapping[str, int] | None = None, expert_axis: str = EXPERT_AXIS,
               model_axis: str = MODEL_AXIS) -> P:
    """PartitionSpec of one parameter given its NNX state path, under `PARAM_RULES`.

    axis_sizes: the mesh's {axis name: size} (None: only the expert rule applies, as if the mesh were
    ("data", "expert") with every split possible). counts: `split_counts` of the model.
    expert_axis / model_axis: the mesh's names for the logical axes "expert" and "model".
    """
    name = ".".join(str(p) for p in path)
    shape = tuple(getattr(value, "shape", ()))
    rename = {EXPERT_AXIS: expert_axis, MODEL_AXIS: model_axis}
    for rule in PARAM_RULES:
        if len(shape) < max(rule.min_ndim, len(rule.axes)) or not re.search(rule.pattern, name):
            continue
        axes = []
        for dim, logical in zip(shape, rule.axes):
            axis = rename.get(logical, logical)
            if axis is None:
                axes.append(None)
                continue
            if axis_sizes is None:  # no mesh given: the expert rule alone (the expert-parallel layer's default)
                axes.append(axis if logical == EXPERT_AXIS else None)
                continue
            size = axis_sizes.get(axis)
            count = (counts or {}).get(rule.group, dim)
            axes.append(axis if size is not None and count % size == 0 and dim % size == 0 else None)
        while axes and axes[-1] is None:
            axes.pop()
        return P(*axes)
    return P()


def token_spec(axes=(DATA_AXIS, EXPERT_AXIS)) -> P:
    """Tokens [T, H]: the token axis split over all the given mesh axes."""
    return P(tuple(axes))


def _spec_fn(mesh: Mesh, counts, expert_axis: str, model_axis: str):
    sizes = dict(mesh.shape)
    return lambda path, value: param_spec(path, value, axis_sizes=sizes, counts=counts, expert_axis=expert_axis,
                                          model_axis=model_axis)


def state_shardings(state: nnx.State, mesh: Mesh, *, counts: Mapping[str, int] | None = None,
                    expert_axis: str = EXPERT_AXIS, model_axis: str = MODEL_AXIS):
    """A pytree of NamedShardings matching `state` (from `nnx.split`) under the rules above."""
    spec = _spec_fn(mesh, counts, expert_axis, model_axis)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        flat.append((path, var.replace(NamedSharding(mesh, spec(path, value))) if hasattr(value, "ndim") else var))
    return nnx.from_flat_state(flat)


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a host value every process holds in full (works across
    processes: each one fills only its addressable shards)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: nnx.State, mesh: Mesh, *, counts: Mapping[str, int] | None = None,
                expert_axis: str = EXPERT_AXIS, model_axis: str = MODEL_AXIS) -> nnx.State:
    """Places every array of `state` on `mesh` according to `param_spec` (multi-process safe when
    every process holds the same full values, e.g. built from the same seed)."""
    spec = _spec_fn(mesh, counts, expert_axis, model_axis)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if hasattr(value, "ndim"):
            value = global_array(value, NamedSharding(mesh, spec(path, value)))
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


__all__ = ["EXPERT_PARAM_OWNER", "PARAM_RULES", "ParamRule", "global_array", "param_spec", "shard_state",
           "split_counts", "state_shardings", "token_spec"]
