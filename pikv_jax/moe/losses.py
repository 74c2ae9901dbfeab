"""Auxiliary router losses and routing statistics (plain jnp, differentiable where it matters).

Conventions: probs f32[T, E] (rows sum to 1), logits f32[T, E], expert_idx i32[T, K], active bool[T, K].
"Importance" P_e = mean_t probs[t, e] (differentiable); "load" f_e = share of the active
assignments that went to expert e (a count, not differentiable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pikv_jax.moe.dispatch import tokens_per_expert

_EPS = 1e-9


def load_fraction(expert_idx, active, num_experts: int):
    """f32[E]: f_e = assignments to e / all active assignments (sums to 1; 0 when nothing is active)."""
    counts = tokens_per_expert(expert_idx, active, num_experts).astype(jnp.float32)
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def importance(probs):
    """f32[E]: P_e = mean over tokens of the router probability of e."""
    return jnp.mean(probs.astype(jnp.float32), axis=0)


def switch_load_balancing_loss(probs, expert_idx, active):
    """Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    Equals 1 under perfect balance and E when every token goes to one expert. With top-k routing
    f_e counts all K choices (normalised over T*K), so the minimum stays 1.
    """
    e = probs.shape[-1]
    return e * jnp.sum(jax.lax.stop_gradient(load_fraction(expert_idx, active, e)) * importance(probs))


def router_z_loss(logits):
    """ST-MoE (Zoph et al. 2022, eq. 5): mean_t logsumexp(logits_t)^2; keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def entropy_balance_loss(probs):
    """log(E) - H(P): 0 when the importance P is uniform, log(E) when one expert takes everything."""
    p = importance(probs)
    return jnp.log(p.shape[-1]) + jnp.sum(p * jnp.log(p + _EPS))


def variance_balance_loss(probs):
    """Squared coefficient of variation of importance (Shazeer et al. 2017's importance loss):
    Var(P) / mean(P)^2 = E^2 * Var(P)."""
    p = importance(probs)
    return jnp.var(p) / jnp.square(jnp.mean(p) + _EPS)


def gini_balance_loss(probs):
    """Gini coefficient of importance: sum_ij |P_i - P_j| / (2 E sum P); 0 = balanced, (E-1)/E = collapsed."""
    p = importance(probs)
    e = p.shape[-1]
    return jnp.sum(jnp.abs(p[:, None] - p[None, :])) / (2.0 * e * jnp.sum(p) + _EPS)


def router_entropy(probs):
    """Mean per-token entropy of the router distribution (nats): low = confident routing."""
    p = probs.astype(jnp.float32)
    return -jnp.mean(jnp.sum(p * jnp.log(p + _EPS), axis=-1))


__all__ = ["entropy_balance_loss", "gini_balance_loss", "importance", "load_fraction", "router_entropy",
           "router_z_loss", "switch_load_balancing_loss", "variance_balance_loss"]
