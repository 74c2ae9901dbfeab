"""Expected Attention (Devoto et al., 2025; kvpress's ExpectedAttentionPress): score each prompt key by
the attention that *future* queries are expected to give it, without seeing those queries.

Steps, per row, layer and query head h:

1. Query statistics: mean mu_h and covariance Sigma_h of the prompt's queries before RoPE, over the
   row's real positions from `n_sink` on (the sinks' queries are atypical). The covariance divides
   by the number of queries N (the maximum-likelihood estimate; kvpress's choice differs by N/(N-1)).
2. Future positions: the next `n_future_positions` queries sit at positions L..L+n-1 (L = the row's
   length); each is rotated by its own RoPE matrix R_t, so the model averages them:
   R = mean_t R_t, mu' = R mu, Sigma' = R Sigma R^T.
3. For a Gaussian query q ~ N(mu', Sigma'), E[exp(q.k / sqrt(d))] = exp(k.mu'/sqrt(d) + k^T Sigma' k / (2d)):
   the logit a_j = k_j.mu'/sqrt(d) + k_j^T Sigma' k_j / (2d), then softmax over the row's keys.
4. Mean over the GQA group (`group_reduce`), then (p_j + epsilon) * ||v_j|| when `use_vnorm`
   (a key's effect on the output scales with its value's norm; epsilon keeps tokens with tiny
   expected attention from all tying at 0).

Prefill selection only (like SnapKV): decoded tokens are appended; compose with a decode-time policy
(`expected_attention+h2o@0.25`) to evict while decoding. The scores need the queries before RoPE and
the model's RoPE frequencies, which the forward pass gives every policy (`PrefillContext.q_raw`,
`inv_freq`). Query-agnostic by construction: the statistics come from the whole prompt, not from a
question at its end, so the same selection serves any later question.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pikv_jax.attention.reference import reduce_group
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.scoring import key_norms


def averaged_rope(start: Int[Array, " b"], n: int, inv_freq: Float[Array, " half"]) -> Float[Array, "b d d"]:
    """mean_{t < n} R(start + t): the rotate-half RoPE matrix averaged over n consecutive positions.

    R(p) rotates channel pairs (i, i + D/2) by angle p * inv_freq[i]; its mean keeps that block form
    with cos and sin replaced by their means (no longer a rotation: it shrinks fast-spinning pairs).
    """
    angles = (start[:, None, None].astype(jnp.float32) + jnp.arange(n, dtype=jnp.float32)[None, :, None]) * inv_freq
    c, s = jnp.mean(jnp.cos(angles), axis=1), jnp.mean(jnp.sin(angles), axis=1)  # [B, D/2]
    half = inv_freq.shape[0]
    eye = jnp.eye(half, dtype=jnp.float32)
    cm, sm = c[:, :, None] * eye, s[:, :, None] * eye  # diagonal blocks [B, D/2, D/2]
    top = jnp.concatenate([cm, -sm], axis=-1)  # out_i = c x_i - s x_{i+h}
    bottom = jnp.concatenate([sm, cm], axis=-1)  # out_{i+h} = s x_i + c x_{i+h}
    return jnp.concatenate([top, bottom], axis=-2)


def query_statistics(q_raw: Float[Array, "b s h d"], pos: Int[Array, "b s"], n_sink: int):
    """(mu f32[B, H, D], Sigma f32[B, H, D, D]) of the queries at real positions >= n_sink (all real
    positions when the row has no other)."""
    q = q_raw.astype(jnp.float32)
    use = pos >= n_sink
    use = jnp.where(jnp.any(use, axis=1, keepdims=True), use, pos >= 0)
    w = use.astype(jnp.float32)[:, :, None, None]  # [B, S, 1, 1]
    n = jnp.maximum(jnp.sum(w, axis=1), 1.0)  # [B, 1, 1]
    mu = jnp.sum(q * w, axis=1) / n  # [B, H, D]
    centred = (q - mu[:, None]) * w
    cov = jnp.einsum("bshd,bshe->bhde", centred, centred) / n[..., None]
    return mu, cov


def expected_attention_scores(k: Float[Array, "b s hk d"], v: Float[Array, "b s hk d"], pos: Int[Array, "b s"],
                              mu: Float[Array, "b h d"], cov: Float[Array, "b h d d"] | None, *,
                              group_reduce: str = "mean", epsilon: float = 0.0,
                              use_vnorm: bool = True) -> Float[Array, "b hk s"]:
    """Steps 3-4 of the module docstring for already-rotated statistics; padding scores -inf."""
    b, s, hk, d = k.shape
    g = mu.shape[1] // hk
    k32 = k.astype(jnp.float32)
    mu = mu.reshape(b, hk, g, d)
    logits = jnp.einsum("bshd,bhgd->bhgs", k32, mu) * d ** -0.5
    if cov is not None:
        cov = cov.reshape(b, hk, g, d, d)
        logits = logits + jnp.einsum("bshd,bhgde,bshe->bhgs", k32, cov, k32) / (2 * d)
    valid = (pos >= 0)[:, None, None, :]
    probs = jnp.where(valid, jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1), 0.0)
    scores = reduce_group(probs, group_reduce, axis=2)  # [B, Hkv, S]
    if use_vnorm:
        scores = (scores + epsilon) * jnp.swapaxes(key_norms(v), 1, 2)
    else:
        scores = scores + epsilon
    return jnp.where(pos[:, None, :] >= 0, scores, -jnp.inf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttention(CachePolicy):
    """n_future_positions: future queries the RoPE average spans, default 512. epsilon: added to the
    expected attention before the value-norm weighting, default 0 (the public leaderboard's AdaKV
    configuration uses 1e-2). use_covariance: include the k^T Sigma k / 2d term, default True.
    use_vnorm: multiply by ||v||, default True. n_sink: first positions always kept and left out of
    the query statistics, default 4. decode_evict must stay False (decoded tokens are appended)."""

    name: ClassVar[str] = "expected_attention"
    n_future_positions: int = 512
    epsilon: float = 0.0
    use_covariance: bool = True
    use_vnorm: bool = True

    def __post_init__(self):
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be an integer >= 1, got {self.n_future_positions!r}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.decode_evict:
            raise ValueError("expected_attention scores tokens only at prefill, so it cannot evict at decode time; "
                             "compose it with a decode-time policy (e.g. expected_attention+h2o@0.25)")
        super().__post_init__()

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        if ctx.q_raw is None or ctx.inv_freq is None:
            raise ValueError("expected_attention needs the queries before RoPE and the RoPE frequencies "
                             "(PrefillContext.q_raw and inv_freq); the model's forward pass provides them")
        mu, cov = query_statistics(ctx.q_raw, ctx.pos, self.n_sink)
        rot = averaged_rope(ctx.lengths, self.n_future_positions, ctx.inv_freq)  # [B, D, D]
        mu = jnp.einsum("bde,bhe->bhd", rot, mu)
        cov = jnp.einsum("bde,bhef,bgf->bhdg", rot, cov, rot) if self.use_covariance else None
        return expected_attention_scores(ctx.k, ctx.v, ctx.pos, mu, cov, group_reduce=self.group_reduce,
                                         epsilon=self.epsilon, use_vnorm=self.use_vnorm)
