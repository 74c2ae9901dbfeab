"""HierarchicalRouter: two-level gating, first over expert groups, then over experts in a group."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe import losses
from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, renormalize


class HierarchicalRouter(BaseRouter):
    """Hierarchical mixture of experts (Shazeer et al. 2017, appendix B).

    The E experts form G contiguous groups of E/G (group g holds experts g*E/G .. (g+1)*E/G - 1,
    which is also how an expert mesh axis lays them out, so limiting groups limits devices).

    Routing algorithm:
      1. Expert logits l[T, E] = x @ W_gate, seen as [T, G, E/G].
      2. Group distribution q[T, G] = softmax(x @ W_group + logsumexp_j l[t, g, j]): the group's share
         of the plain softmax, corrected by a learned group gate (W_group = 0 recovers it exactly).
      3. In-group distribution r[T, G, E/G] = softmax over each group of l.
         Joint probs[T, E] = q[t, g] * r[t, g, j] (sums to 1; equals softmax(l) when W_group = 0).
      4. Keep the `top_groups` most probable groups per token; experts of other groups are masked.
      5. expert_idx = top-k of the masked joint probs; gates renormalised over the K choices.
      6. Auxiliary loss = Switch load balance over experts + group-level Switch loss (coefficient
         `group_balance_coef`) + z-loss on the in-group logits.
    """

    kind: ClassVar[str] = "hierarchical"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, num_groups: int = 2,
                 top_groups: int = 1, group_balance_coef: float = 0.01, rngs: nnx.Rngs | None = None, **kw):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(hidden_size, num_experts, top_k, rngs=rngs, **kw)
        if not isinstance(num_groups, int) or num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups={num_groups!r} must be >= 1 and divide num_experts={num_experts}")
        if not 1 <= top_groups <= num_groups:
            raise ValueError(f"top_groups={top_groups} must be in [1, num_groups={num_groups}]")
        per_group = num_experts // num_groups
        if top_k > top_groups * per_group:
            raise ValueError(f"top_k={top_k} exceeds the {top_groups * per_group} experts in top_groups={top_groups} "
                             f"groups of {per_group}; raise top_groups or lower top_k")
        self.num_groups, self.top_groups, self.per_group = num_groups, top_groups, per_group
        self.set_aux_coefs(group_balance=group_balance_coef)
        self.group_gate = RouterExtraParam(
            jax.random.normal(rngs.params(), (hidden_size, num_groups), jnp.float32) * hidden_size ** -0.5)

    def _select(self, logits, x2, training, key, inputs):
        t = logits.shape[0]
        grouped = logits.reshape(t, self.num_groups, self.per_group)
        g_logits = x2.astype(jnp.float32) @ self.group_gate[...] + jax.nn.logsumexp(grouped, axis=-1)  # [T, G]
        q = jax.nn.softmax(g_logits, axis=-1)
        r = jax.nn.softmax(grouped, axis=-1)
        probs = (q[:, :, None] * r).reshape(t, self.num_experts)
        _, groups = jax.lax.top_k(q, self.top_groups)  # [T, top_groups]
        group_ok = jnp.sum(jax.nn.one_hot(groups, self.num_groups, dtype=jnp.float32), axis=1) > 0  # [T, G]
        expert_ok = jnp.repeat(group_ok, self.per_group, axis=1)  # [T, E]
        masked = jnp.where(expert_ok, probs, -1.0)
        p, idx = jax.lax.top_k(masked, self.top_k)
        active = jnp.ones(idx.shape, bool)
        g_idx = groups.astype(jnp.int32)
        group_loss = losses.switch_load_balancing_loss(q, g_idx, jnp.ones(g_idx.shape, bool))
        return probs, idx.astype(jnp.int32), renormalize(p, active), active, {"group_balance": group_loss}

    def _aux_terms(self, logits, probs, expert_idx, active):
        t = logits.shape[0]
        return {"load_balance": losses.switch_load_balancing_loss(probs, expert_idx, active),
                "z_loss": losses.router_z_loss(logits.reshape(t * self.num_groups, self.per_group))}
