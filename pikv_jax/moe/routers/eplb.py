"""EPLBRouter: auxiliary-loss-free load balancing with a per-expert selection bias (DeepSeek-V3)."""

from __future__ import annotations

from typing import ClassVar

import flax.errors
import jax
import jax.numpy as jnp

from pikv_jax.moe import losses
from pikv_jax.moe.dispatch import tokens_per_expert
from pikv_jax.moe.routers.base import BaseRouter, RouterState, renormalize

SCORE_FUNCTIONS = ("sigmoid", "softmax")


class ExpertBias(RouterState):
    """f32[E] bias added to the routing scores for expert selection only."""


class ExpertLoad(RouterState):
    """f32[E] tokens each expert was asked to take in the last training call (observed load)."""


def eplb_bias_update(bias, load, rate: float):
    """DeepSeek-V3's update: b_e += rate * sign(mean(load) - load_e) (overloaded experts go down)."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load)


class EPLBRouter(BaseRouter):
    """Expert-load-balanced routing without a balance loss in the gradient path (DeepSeek-V3, 2024).

    Routing algorithm:
      1. scores s[T, E] = sigmoid(x @ W_gate) (or softmax, `score_function`).
      2. Selection: expert_idx = top-k of (s + b) where b[E] is the `ExpertBias` state; the bias only
         decides *which* experts, never how much they weigh.
      3. gates = s at the chosen experts, normalised to sum to 1 over the K choices.
      4. Training with `update_bias=True`: load[E] = assignments per expert in this call;
         b <- b + bias_update_rate * sign(mean(load) - load) (stored in the `ExpertBias` variable, so
         under `nnx.jit` or `nnx.split`/`merge` it is carried as explicit state; inside a plain
         `jax.grad`, merge with `copy=True` or use `nnx.grad`). Eval never updates.
      5. Auxiliary loss: the complementary sequence-wise balance loss alpha * E * sum_e f_e P'_e with
         P' = mean of the per-token normalised scores (alpha = `balance_coef`, tiny by default)
         + the router z-loss on the logits.
    """

    kind: ClassVar[str] = "eplb"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score_function: str = "sigmoid",
                 bias_update_rate: float = 1e-3, update_bias: bool = True, balance_coef: float = 1e-4, **kw):
        super().__init__(hidden_size, num_experts, top_k, **kw)
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function={score_function!r} is not supported; allowed: {SCORE_FUNCTIONS}")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.score_function, self.bias_update_rate, self.update_bias = score_function, bias_update_rate, update_bias
        self.set_aux_coefs(sequence_balance=balance_coef)
        self.bias = ExpertBias(jnp.zeros((num_experts,), jnp.float32))
        self.observed_load = ExpertLoad(jnp.zeros((num_experts,), jnp.float32))

    def scores(self, logits):
        if self.score_function == "sigmoid":
            return jax.nn.sigmoid(logits)
        return jax.nn.softmax(logits, axis=-1)

    def _select(self, logits, x2, training, key, inputs):
        s = self.scores(logits)
        _, idx = jax.lax.top_k(s + jax.lax.stop_gradient(self.bias[...])[None, :], self.top_k)
        idx = idx.astype(jnp.int32)
        active = jnp.ones(idx.shape, bool)
        gates = renormalize(jnp.take_along_axis(s, idx, axis=-1), active)
        if training and self.update_bias:
            load = tokens_per_expert(idx, active, self.num_experts).astype(jnp.float32)
            try:
                self.observed_load[...] = load
                self.bias[...] = eplb_bias_update(self.bias[...], load, self.bias_update_rate)
            except flax.errors.TraceContextError as e:
                raise ValueError(
                    "EPLBRouter updates its bias in training, so its state must be writable here: use nnx.jit / "
                    "nnx.grad, or nnx.merge(..., copy=True) inside the jax transform (or update_bias=False)") from e
        probs = s / jnp.sum(s, axis=-1, keepdims=True)  # per-token normalised scores (P')
        return probs, idx, gates, active, {}

    def _aux_terms(self, logits, probs, expert_idx, active):
        return {"sequence_balance": losses.switch_load_balancing_loss(probs, expert_idx, active),
                "z_loss": losses.router_z_loss(logits)}
