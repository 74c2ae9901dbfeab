"""MixtureOfExpertsRouter: a token-dependent mixture of several gating heads, with separate
capacity factors for training and evaluation."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe import losses
from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, renormalize


class MixtureOfExpertsRouter(BaseRouter):
    """M gating heads whose distributions are mixed per token.

    Switch Transformer trains with a tight capacity factor and evaluates with a looser one (fewer
    drops at inference); this router defaults to capacity_factor=1.25 in training and
    eval_capacity_factor=2.0 in evaluation.

    Routing algorithm:
      1. Head logits l_m[T, E]: head 0 is W_gate (the checkpoint gate), heads 1..M-1 are W_extra[m].
      2. Mixing weights w[T, M] = softmax(x @ W_mix).
      3. probs[T, E] = sum_m w[t, m] * softmax(l_m[t]).
      4. expert_idx = top-k of probs; gates renormalised over the K choices.
      5. Switch load balance on the mixed probs + z-loss averaged over heads.
    Capacity: ceil(cf * T * K / E) with cf = capacity_factor (training) or eval_capacity_factor (eval).
    """

    kind: ClassVar[str] = "mixture"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, num_heads: int = 2,
                 rngs: nnx.Rngs | None = None, **kw):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw.setdefault("capacity_factor", 1.25)
        kw.setdefault("eval_capacity_factor", 2.0)
        super().__init__(hidden_size, num_experts, top_k, rngs=rngs, **kw)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        self.num_heads = num_heads
        self.set_aux_coefs(extra_heads_z_loss=self.aux_coef("z_loss"))
        scale = hidden_size ** -0.5
        self.extra_gates = RouterExtraParam(
            jax.random.normal(rngs.params(), (num_heads - 1, hidden_size, num_experts), jnp.float32) * scale)
        self.mix = RouterExtraParam(jax.random.normal(rngs.params(), (hidden_size, num_heads), jnp.float32) * scale)

    def head_logits(self, x2, logits0):
        """f32[M, T, E]: every head's logits (head 0 is the gate's)."""
        extra = jnp.einsum("th,mhe->mte", x2.astype(jnp.float32), self.extra_gates[...])
        return jnp.concatenate([logits0[None], extra], axis=0)

    def _select(self, logits, x2, training, key, inputs):
        heads = self.head_logits(x2, logits)
        w = jax.nn.softmax(x2.astype(jnp.float32) @ self.mix[...], axis=-1)  # [T, M]
        probs = jnp.einsum("tm,mte->te", w, jax.nn.softmax(heads, axis=-1))
        p, idx = jax.lax.top_k(probs, self.top_k)
        active = jnp.ones(idx.shape, bool)
        z = jnp.mean(jax.vmap(losses.router_z_loss)(heads[1:])) if self.num_heads > 1 else jnp.float32(0.0)
        return probs, idx.astype(jnp.int32), renormalize(p, active), active, {"extra_heads_z_loss": z}
