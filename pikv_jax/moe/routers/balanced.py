"""TopKBalancedRouter: top-k routing plus explicit balance penalties on the expert importance."""

from __future__ import annotations

from typing import ClassVar

from pikv_jax.moe import losses
from pikv_jax.moe.routers.base import BaseRouter


class TopKBalancedRouter(BaseRouter):
    """Top-k router whose auxiliary loss adds balance terms on the importance P_e = mean_t probs[t, e].

    Routing algorithm:
      1-3. As `BaseRouter` (logits, optional training noise, top-k gating).
      4. Auxiliary loss = Switch load balance + z-loss (as the base) plus
         entropy_coef  * (log E - H(P))            (0 when P is uniform),
         variance_coef * Var(P) / mean(P)^2        (Shazeer et al. 2017's CV^2 importance loss),
         gini_coef     * Gini(P)                   (0 = balanced, (E-1)/E = collapsed).
         All three are differentiable in the router weights through P.
    """

    kind: ClassVar[str] = "topk_balanced"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, entropy_coef: float = 0.01,
                 variance_coef: float = 0.01, gini_coef: float = 0.01, **kw):
        super().__init__(hidden_size, num_experts, top_k, **kw)
        for name, v in (("entropy_coef", entropy_coef), ("variance_coef", variance_coef), ("gini_coef", gini_coef)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.set_aux_coefs(entropy_balance=entropy_coef, variance_balance=variance_coef, gini_balance=gini_coef)

    def _aux_terms(self, logits, probs, expert_idx, active):
        terms = super()._aux_terms(logits, probs, expert_idx, active)
        terms.update(entropy_balance=losses.entropy_balance_loss(probs),
                     variance_balance=losses.variance_balance_loss(probs),
                     gini_balance=losses.gini_balance_loss(probs))
        return terms
