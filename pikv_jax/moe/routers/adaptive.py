"""AdaptiveRouter: importance-aware routing with a per-token number of experts (dynamic top-p)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, per_token_features, renormalize


class AdaptiveRouter(BaseRouter):
    """Each token uses between `min_k` and `top_k` experts, more when it is important.

    Dynamic routing in the style of top-p routing (Huang et al. 2024, "Harder tasks need more
    experts"): a token keeps adding experts, most probable first, until their cumulative probability
    reaches its threshold. The threshold grows with the token's importance, so important tokens get
    more experts. Importance comes from the caller (`importance=` f32 in [0, 1], per token or per
    sequence, e.g. attention mass from the KV cache) or from a learned predictor sigmoid(x.w + b).

    Routing algorithm:
      1. logits[T, E] = x @ W_gate; probs = softmax(logits).
      2. Top-K probs p[T, K] sorted descending (K = top_k, the static maximum).
      3. importance i[T] in [0, 1]; threshold tau[T] = min_threshold + (max_threshold - min_threshold) * i.
      4. k[T] = 1 + #{j < K - 1 : cumsum(p)[j] < tau}, clipped to [min_k, K].
      5. active[T, K] = j < k[T]; gates = p renormalised over the active choices.
      6. Auxiliary loss = Switch load balance (active choices) + z-loss
         + importance_coef * mean(i) (an expert budget: the learned predictor is pushed towards
           fewer experts unless the task loss pays for them).
    """

    kind: ClassVar[str] = "adaptive"
    accepts: ClassVar[tuple[str, ...]] = ("importance",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, min_k: int = 1,
                 min_threshold: float = 0.5, max_threshold: float = 0.9, importance_coef: float = 0.01,
                 rngs: nnx.Rngs | None = None, **kw):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(hidden_size, num_experts, top_k, rngs=rngs, **kw)
        if not 1 <= min_k <= top_k:
            raise ValueError(f"min_k={min_k} must be in [1, top_k={top_k}]")
        if not 0.0 < min_threshold <= max_threshold <= 1.0:
            raise ValueError(f"need 0 < min_threshold <= max_threshold <= 1, got {min_threshold}, {max_threshold}")
        self.min_k, self.min_threshold, self.max_threshold = min_k, min_threshold, max_threshold
        self.set_aux_coefs(importance=importance_coef)
        self.importance_w = RouterExtraParam(
            jax.random.normal(rngs.params(), (hidden_size,), jnp.float32) * hidden_size ** -0.5)
        self.importance_b = RouterExtraParam(jnp.zeros((), jnp.float32))

    def token_importance(self, x2, inputs):
        """f32[T] in [0, 1]: the caller's importance when given, else the learned predictor."""
        given = inputs.get("importance")
        if given is not None:
            imp = per_token_features("importance", given, inputs["_lead"], None)
            return jnp.clip(imp, 0.0, 1.0)
        return jax.nn.sigmoid(x2.astype(jnp.float32) @ self.importance_w[...] + self.importance_b[...])

    def _select(self, logits, x2, training, key, inputs):
        probs = jax.nn.softmax(logits, axis=-1)
        p, idx = jax.lax.top_k(probs, self.top_k)  # [T, K] descending
        imp = self.token_importance(x2, inputs)
        tau = self.min_threshold + (self.max_threshold - self.min_threshold) * jax.lax.stop_gradient(imp)
        below = jnp.cumsum(p, axis=-1)[:, : self.top_k - 1] < tau[:, None]  # [T, K-1]
        k_t = jnp.clip(1 + jnp.sum(below, axis=-1), self.min_k, self.top_k)  # [T]
        active = jnp.arange(self.top_k)[None, :] < k_t[:, None]
        return probs, idx.astype(jnp.int32), renormalize(p, active), active, {"importance": jnp.mean(imp)}

    def experts_per_token(self, routing) -> jax.Array:
        """i32[T]: how many experts each token used."""
        return jnp.sum(routing.active, axis=-1)
