"""SinkhornRouter: balanced assignment by Sinkhorn iterations (BASE layers / S-BASE)."""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from pikv_jax.moe.routers.base import BaseRouter, renormalize


def sinkhorn_log(logits, num_iters: int):
    """Log-domain Sinkhorn: returns log Pi[T, E] whose rows sum to 1 and columns to T/E (approximately,
    exactly at convergence), Pi proportional to exp(logits) rescaled per row and column.

    Each iteration: normalise rows (logsumexp over E), then columns (logsumexp over T, plus log(T/E)).
    """
    t, e = logits.shape
    col_target = math.log(t / e)

    def body(_, lp):
        lp = lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)
        return lp - jax.nn.logsumexp(lp, axis=0, keepdims=True) + col_target

    return jax.lax.fori_loop(0, num_iters, body, logits.astype(jnp.float32))


class SinkhornRouter(BaseRouter):
    """Routing by an (approximately) balanced assignment of tokens to experts.

    BASE layers (Lewis et al. 2021) solve a linear assignment so that every expert gets T/E tokens;
    S-BASE (Clark et al. 2022) replaces the exact solver by Sinkhorn iterations, as here.

    Routing algorithm:
      1. logits[T, E] = x @ W_gate.
      2. log Pi = sinkhorn_log(logits / temperature, num_iters): rows sum to 1, columns to T/E.
      3. expert_idx = top-k of Pi per token (Pi is not differentiated: the assignment is a choice).
      4. gates = softmax(logits) at the chosen experts, renormalised over the K choices.
      5. Auxiliary loss = Switch load balance + z-loss (they still train the gate's probabilities).
    With `eval_balanced=False`, evaluation skips step 2 and routes by plain top-k of the softmax.
    """

    kind: ClassVar[str] = "sinkhorn"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, num_iters: int = 8,
                 temperature: float = 1.0, eval_balanced: bool = True, **kw):
        super().__init__(hidden_size, num_experts, top_k, **kw)
        if not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"num_iters must be an integer >= 1, got {num_iters!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_iters, self.temperature, self.eval_balanced = num_iters, temperature, eval_balanced

    def _select(self, logits, x2, training, key, inputs):
        probs = jax.nn.softmax(logits, axis=-1)
        if training or self.eval_balanced:
            balanced = sinkhorn_log(jax.lax.stop_gradient(logits) / self.temperature, self.num_iters)
        else:
            balanced = jax.lax.stop_gradient(logits)
        _, idx = jax.lax.top_k(balanced, self.top_k)
        idx = idx.astype(jnp.int32)
        active = jnp.ones(idx.shape, bool)
        return probs, idx, renormalize(jnp.take_along_axis(probs, idx, axis=-1), active), active, {}
