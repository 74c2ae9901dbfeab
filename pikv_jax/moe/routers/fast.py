"""FastMoERouter: FastMoE's gate (linear with bias, top-k logits, softmax over the k), optionally
with GShard's random routing of the second expert."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, renormalize


class FastMoERouter(BaseRouter):
    """FastMoE `NaiveGate` (He et al. 2021) with GShard random routing as an option.

    Routing algorithm:
      1. logits[T, E] = x @ W_gate + b (the bias starts at 0).
      2. expert_idx = top-k logits; gates = softmax over those k logits (FastMoE's gate score).
      3. Training with `random_routing=True` (GShard, Lepikhin et al. 2020): a choice j >= 1 is kept
         only if u < 2 * gate_j with u ~ U(0, 1) drawn from `key`; kept gates are renormalised.
         Evaluation keeps every choice (deterministic).
      4. Switch load balance + z-loss as `BaseRouter`.
    """

    kind: ClassVar[str] = "fast"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, random_routing: bool = False, **kw):
        kw.setdefault("gating", "topk_softmax")
        super().__init__(hidden_size, num_experts, top_k, **kw)
        self.random_routing = random_routing
        self.gate_bias = RouterExtraParam(jnp.zeros((num_experts,), jnp.float32))

    def _logits(self, x2, inputs):
        return super()._logits(x2, inputs) + self.gate_bias[...]

    def _select(self, logits, x2, training, key, inputs):
        probs, idx, gates, active, extra = super()._select(logits, x2, training, key, inputs)
        if training and self.random_routing and self.top_k > 1:
            if key is None:
                raise ValueError("router 'fast' with random_routing=True needs key= in training")
            u = jax.random.uniform(jax.random.fold_in(key, 1), gates.shape)
            first = jnp.arange(self.top_k)[None, :] == 0
            active = first | (u < 2.0 * gates)
            gates = renormalize(gates, active)
        return probs, idx, gates, active, extra
