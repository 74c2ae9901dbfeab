"""PiKVMoE: a sparse mixture-of-experts feed-forward layer with LoRA-adapted experts.

PiKV's own MoE runs every expert on every token and ignores its routing; this one computes only the
chosen experts. Two execution paths share the router and the experts:

- capacity (default): GShard/Switch dispatch at a fixed capacity per expert and token group, static
  shapes, drops counted; the same code, with an `all_to_all` in the middle, is the expert-parallel
  `DistributedPiKVMoE`.
- dropless (`dropless=True`): tokens sorted by expert and multiplied with `jax.lax.ragged_dot`.

Forward algorithm (x: [..., H], T tokens):
  1. routing = router.route(x): probs[T, E], expert_idx[T, K], gates[T, K], aux loss.
  2a. capacity: split the T tokens into `num_groups` groups of T/G; per group give every assignment
      its queue position in its expert (C = router.capacity(T/G) slots, later ones dropped), scatter
      the tokens into expert_in[E, G*C, H], run the experts, gather and weight by the gates (the
      execution of the router's dispatch/combine tensors, without materialising them).
  2b. dropless: sort the T*K assignments by expert, y_sorted = experts(x_sorted) grouped by
      `ragged_dot`, unsort, y[t] = sum_k gates[t, k] * y[t, k].
  3. Optional shared expert (Qwen-MoE): y += sigmoid(x @ w_shared_gate) * shared_mlp(x).
  4. aux loss = router aux loss (+ distill_coef * distillation loss when a teacher is given).
"""

from __future__ import annotations

from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pikv_jax.moe import distill, losses
from pikv_jax.moe.dispatch import (
    capacity_positions,
    gather_from_slots,
    scatter_gates,
    scatter_to_slots,
    slot_indices,
    sort_by_expert,
    tokens_per_expert,
    unsort_and_combine,
)
from pikv_jax.moe.expert_parallel import ExpertParallel, expert_parallel_output
from pikv_jax.moe.experts import Experts, SharedExpert
from pikv_jax.moe.routers import BaseRouter, Routing, create_moe_router


class MoEStats(nnx.Variable):
    """Routing statistics of the last call (dict of arrays; None before the first call). Not learned."""



@struct.dataclass
class MoEAux:
    """loss: f32[] total auxiliary loss (router + distillation); stats: dict name -> array."""

    loss: jax.Array
    stats: dict[str, Any]


def grouped_capacity_moe(x2, routing: Routing, num_experts: int, capacity: int, num_groups: int, expert_fn):
    """Capacity-dispatched MoE over `num_groups` token groups, each with its own capacity.

    1. Per group: queue positions (`capacity_positions`) -> flat slots e * C + position (E * C = dropped).
    2. Scatter each kept assignment's token into its slot: [G, E * C, H] -> expert_in [E, G * C, H].
    3. expert_out = expert_fn(expert_in) (a batched einsum, or all_to_all + local experts + all_to_all).
    4. Gather each assignment's slot back and combine: y[t] = sum_k kept * gate * expert_out[slot].
    x2: [T, H]; expert_fn: [E, G*C, H] -> [E, G*C, H]. Returns (y f32[T, H], processed i32[E], dropped i32[]).
    """
    t, h = x2.shape
    g, e, c = num_groups, num_experts, capacity
    tg = t // g
    split = lambda a: a.reshape((g, tg) + a.shape[1:])
    idx, gates, active = split(routing.expert_idx), split(routing.gates), split(routing.active)
    position, kept, dropped = jax.vmap(lambda i, a: capacity_positions(i, a, e, c))(idx, active)
    slots = jax.vmap(lambda i, p, k: slot_indices(i, p, k, c, e))(idx, position, kept)  # [G, Tg, K]
    xs = jax.vmap(lambda x, s: scatter_to_slots(x, s, e * c))(x2.reshape(g, tg, h), slots)  # [G, E*C, H]
    expert_in = jnp.swapaxes(xs.reshape(g, e, c, h), 0, 1).reshape(e, g * c, h)
    expert_out = jnp.swapaxes(expert_fn(expert_in).reshape(e, g, c, h), 0, 1).reshape(g, e * c, h)
    weights = jnp.where(kept, gates, 0.0)
    y = jax.vmap(gather_from_slots)(expert_out, slots, weights).reshape(t, h)
    processed = tokens_per_expert(idx.reshape(t, -1), kept.reshape(t, -1), e)
    return y, processed, jnp.sum(dropped)


def routing_stats(routing: Routing, processed, dropped, capacity: int) -> dict[str, jax.Array]:
    """Array statistics of one call: loads, drops, auxiliary terms, router entropy."""
    e = routing.probs.shape[-1]
    requested = tokens_per_expert(routing.expert_idx, routing.active, e).astype(jnp.float32)
    assignments = jnp.maximum(jnp.sum(requested), 1.0)
    return {
        "tokens_per_expert": requested,
        "expert_load": requested / assignments,
        "processed_per_expert": processed.astype(jnp.float32),
        "dropped": dropped.astype(jnp.float32),
        "drop_rate": dropped.astype(jnp.float32) / assignments,
        "overflowed_experts": jnp.sum(requested > capacity).astype(jnp.float32),
        "capacity": jnp.float32(capacity),
        "num_tokens": jnp.float32(routing.probs.shape[0]),
        "router_entropy": losses.router_entropy(routing.probs),
        "router_aux_loss": routing.aux_loss,
        **{"aux_" + n: v for n, v in routing.aux.items()},
    }


class PiKVMoE(nnx.Module):
    """Sparse MoE feed-forward layer with LoRA-adapted SwiGLU experts (see the module docstring).

    Args:
      hidden_size, num_experts, top_k: model width, experts, experts per token.
      rank, alpha: LoRA rank (0 = plain experts) and scale numerator (adapter scale = alpha / rank).
      router: a kind for `create_moe_router` or a router module built for the same sizes.
      use_distillation, teacher_hidden_size: add a projection of a teacher's hidden states
        [.., teacher_hidden_size] -> [.., hidden_size] and an MSE distillation loss (teacher_hidden_size
        defaults to 2 * hidden_size, as in PiKV's guide).
      intermediate_size: expert width (default 2 * hidden_size).
      capacity_factor: overrides the router's capacity factor (training and evaluation).
      dropless: use the ragged (sort + ragged_dot) path; nothing is dropped.
      num_groups: capacity groups (GShard); the expert-parallel layer uses one group per token shard.
      shared_expert_size: width of a sigmoid-gated shared expert (0 = none).
      router_kwargs: options for the router when `router` is a kind.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, rank: int = 4, alpha: float = 8.0,
                 router: str | BaseRouter = "base", use_distillation: bool = False,
                 teacher_hidden_size: int | None = None, *, intermediate_size: int | None = None,
                 capacity_factor: float | None = None, dropless: bool = False, num_groups: int = 1,
                 shared_expert_size: int = 0, distill_coef: float = 1.0, router_kwargs: dict | None = None,
                 dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} is larger than num_experts={num_experts} or < 1; "
                             f"allowed: 1..{num_experts}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        if use_distillation and teacher_hidden_size is None:
            teacher_hidden_size = 2 * hidden_size  # the seed's default: config['hidden_size'] * 2
        if use_distillation and teacher_hidden_size < 1:
            raise ValueError(f"teacher_hidden_size must be >= 1 with use_distillation=True, got {teacher_hidden_size}")
        if shared_expert_size < 0:
            raise ValueError(f"shared_expert_size must be >= 0, got {shared_expert_size}")
        if isinstance(router, str):
            kw = dict(router_kwargs or {})
            if capacity_factor is not None:
                kw["capacity_factor"] = capacity_factor
            router = create_moe_router(router, hidden_size, num_experts, top_k, rngs=rngs, dtype=dtype,
                                       param_dtype=param_dtype if param_dtype is not None else dtype, **kw)
        elif isinstance(router, BaseRouter):
            if (router.hidden_size, router.num_experts, router.top_k) != (hidden_size, num_experts, top_k):
                raise ValueError(f"router was built for (hidden_size, num_experts, top_k)="
                                 f"{(router.hidden_size, router.num_experts, router.top_k)}, the layer has "
                                 f"{(hidden_size, num_experts, top_k)}")
            if router_kwargs:
                raise ValueError("router_kwargs only applies when router is a kind name")
            if capacity_factor is not None:
                router.capacity_factor = router.eval_capacity_factor = capacity_factor
        else:
            raise ValueError(f"router must be a router kind (str) or a BaseRouter, got {type(router).__name__}")
        self.router = router
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.intermediate_size = intermediate_size if intermediate_size is not None else 2 * hidden_size
        self.experts = Experts(num_experts, hidden_size, self.intermediate_size, lora_rank=rank, lora_alpha=alpha,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if shared_expert_size:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_size, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)
            self.shared_expert_gate = nnx.Linear(hidden_size, 1, use_bias=False, dtype=dtype,
                                                 param_dtype=param_dtype if param_dtype is not None else dtype,
                                                 rngs=rngs)
        self.shared_expert_size = shared_expert_size
        self.use_distillation = use_distillation
        if use_distillation:
            self.teacher_proj = nnx.Linear(teacher_hidden_size, hidden_size, use_bias=False, dtype=dtype,
                                           param_dtype=param_dtype if param_dtype is not None else dtype, rngs=rngs)
        self.distill_coef = distill_coef
        self.dropless, self.num_groups = dropless, num_groups
        self.dtype = dtype
        self.stats = MoEStats(None)
        self.expert_parallel: ExpertParallel | None = None  # set by `shard_experts` (static placement)

    # ------------------------------------------------------------------ pieces

    def capacity(self, num_tokens: int, training: bool = False) -> int:
        """Slots per expert and group for a call over `num_tokens` tokens."""
        return self.router.capacity(num_tokens // self.num_groups, training)

    def _check_groups(self, t: int):
        if t % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide the number of tokens T={t}")

    def shard_experts(self, ep: ExpertParallel | None) -> "PiKVMoE":
        """Runs the experts split over `ep.expert_axis` (pikv_jax/moe/expert_parallel.py) from now on;
        None: one device's path. The weights must be placed P(expert_axis) on `ep.mesh`."""
        self.expert_parallel = None if ep is None else ep.check(self.num_experts)
        return self

    def _experts_output(self, x2, routing: Routing, training: bool):
        """-> (y f32[T, H], processed i32[E], dropped i32[], capacity)."""
        t = x2.shape[0]
        if self.expert_parallel is not None:
            return self._expert_parallel_output(x2, routing, training)
        if self.dropless:
            sd = sort_by_expert(routing.expert_idx, routing.active, self.num_experts)
            ys = self.experts.ragged(x2[sd.token], sd.group_sizes)
            y = unsort_and_combine(ys, sd, routing.gates, routing.active)
            return y, sd.group_sizes, jnp.int32(0), t
        self._check_groups(t)
        cap = self.capacity(t, training)
        y, processed, dropped = grouped_capacity_moe(x2, routing, self.num_experts, cap, self.num_groups,
                                                     self.experts.capacity)
        return y, processed, dropped, cap

    def _expert_parallel_output(self, x2, routing: Routing, training: bool):
        """The same result as one device's path: kept assignments decided in the global view (the
        capacity queues over the same groups), the experts run where their weights are."""
        t, e = x2.shape[0], self.num_experts
        if self.dropless:
            kept, dropped, cap = routing.active, jnp.int32(0), t
        else:
            self._check_groups(t)
            cap = self.capacity(t, training)
            g = self.num_groups
            split = lambda a: a.reshape((g, t // g) + a.shape[1:])
            _, kept, dropped = jax.vmap(lambda i, a: capacity_positions(i, a, e, cap))(
                split(routing.expert_idx), split(routing.active))
            kept, dropped = kept.reshape(routing.active.shape), jnp.sum(dropped)
        y = expert_parallel_output(self.expert_parallel, x2.astype(self.dtype), routing.expert_idx, routing.gates,
                                   kept, self.experts.weights(), self.experts.lora_scale)
        return y, tokens_per_expert(routing.expert_idx, kept, e), dropped, cap

    def shared_output(self, x2):
        """f32[T, H]: the gated shared expert's contribution (0 without one)."""
        if not self.shared_expert_size:
            return jnp.zeros(x2.shape, jnp.float32)
        gate = jax.nn.sigmoid(self.shared_expert_gate(x2).astype(jnp.float32))
        return gate * self.shared_expert(x2).astype(jnp.float32)

    def distillation_loss(self, y, teacher_hidden):
        """MSE between the layer output y[..., H] and the projected teacher hidden states [..., H_t]."""
        if not self.use_distillation:
            raise ValueError("teacher_hidden was given but the layer was built with use_distillation=False")
        target = self.teacher_proj(teacher_hidden.astype(self.dtype)).astype(jnp.float32)
        if target.shape != y.shape:
            raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; expected "
                             f"{tuple(y.shape[:-1]) + (self.teacher_proj.in_features,)}")
        return jnp.mean(jnp.square(y.astype(jnp.float32) - target))

    # ------------------------------------------------------------------ forward

    def forward(self, x, *, training: bool = False, key=None, teacher_hidden=None, **router_inputs):
        """Pure forward: x [..., H] -> (y [..., H] in x's dtype, MoEAux)."""
        if x.ndim < 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., hidden_size={self.hidden_size}]")
        x2 = x.reshape(-1, self.hidden_size)
        routing = self.router.route(x, training=training, key=key, **router_inputs)
        y, processed, dropped, cap = self._experts_output(x2, routing, training)
        y = (y + self.shared_output(x2)).reshape(x.shape)
        stats = routing_stats(routing, processed, dropped, cap)
        loss = routing.aux_loss
        if teacher_hidden is not None:
            distill = self.distillation_loss(y, teacher_hidden)
            stats["distill_loss"] = distill
            loss = loss + self.distill_coef * distill
        stats["aux_loss"] = loss
        return y.astype(x.dtype), MoEAux(loss=loss, stats=stats)

    def __call__(self, x, *, training: bool = False, key=None, teacher_hidden=None, **router_inputs):
        """x [..., H] -> y [..., H]; the call's statistics are kept for `get_stats()`.

        Statistics are recorded when the module may be mutated (eagerly, under `nnx.jit`, or when it
        was merged inside the traced function); a module closed over by a plain `jax.jit` records
        nothing and the call stays a pure function of x.
        """
        y, aux = self.forward(x, training=training, key=key, teacher_hidden=teacher_hidden, **router_inputs)
        try:
            self.stats.set_value(aux.stats)
        except flax.errors.TraceContextError:
            pass  # the module was closed over by a plain jax transform: stay pure, record nothing
        return y

    def dense_reference(self, x, *, training: bool = False, key=None, **router_inputs):
        """Every expert on every token, weighted by the routing gates (no capacity): the function the
        sparse paths must equal when nothing is dropped. x [..., H] -> [..., H]."""
        x2 = x.reshape(-1, self.hidden_size)
        routing = self.router.route(x, training=training, key=key, **router_inputs)
        w = scatter_gates(routing.expert_idx, routing.gates, routing.active, self.num_experts)  # [T, E]
        all_out = self.experts.all_tokens(x2).astype(jnp.float32)  # [E, T, H]
        y = jnp.einsum("te,eth->th", w, all_out) + self.shared_output(x2)
        return y.reshape(x.shape).astype(x.dtype)

    def distillation_step(self, input_data, teacher_hidden, optimizer=None, *, key=None) -> dict:
        """The seed's `model.distillation_step`: one optimizer step on this layer's loss (router aux +
        distill_coef * distillation) with a `pikv_jax.moe.SeedOptimizer` (losses only without one).
        See pikv_jax/moe/distill.py."""
        return distill.distillation_step(self, input_data, teacher_hidden, optimizer, key=key)

    def get_stats(self) -> dict:
        """Host-side statistics of the last call: expert loads, drops, auxiliary losses, router entropy."""
        s = self.stats.get_value()
        if s is None:
            return {}
        out: dict[str, Any] = {}
        for k, v in s.items():
            a = np.asarray(v)
            out[k] = a.tolist() if a.ndim else float(a)
        for k in ("dropped", "capacity", "num_tokens", "overflowed_experts"):
            out[k] = int(out[k])
        return out


__all__ = ["MoEAux", "MoEStats", "PiKVMoE", "grouped_capacity_moe", "routing_stats"]
