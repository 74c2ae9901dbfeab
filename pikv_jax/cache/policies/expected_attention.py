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
The sinks (positions < n_sink) are always kept and are left out of the softmax, as in kvpress:
they draw most of the expected attention in many heads, and inside the normaliser they would shrink
those heads' share of the GQA mean; they score +inf.

At prefill the top-budget prompt tokens are kept. With `decode_evict=True` the cache also holds the
prompt's query statistics (mean f32[B, H, D] and covariance f32[B, H, D, D] per layer: H x D x (D + 1)
floats a row, counted in the cache's bytes) and, whenever a token must go, re-scores every resident
key with the future window moved to the current position, evicting the lowest; this costs a
[C x D x D] quadratic form per query head and step, so `evict_every` > 1 amortises it. The number
of query heads must then be known when the cache is built (`num_query_heads`, which `PiKVModel` and
`parse_method` fill from the model). The scores need the queries before RoPE and the model's RoPE
frequencies, which the forward pass gives every policy (`PrefillContext.q_raw`, `inv_freq`).
Query-agnostic by construction: the statistics come from the whole prompt, not from a question at
its end, so the same selection serves any later question.
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


def expected_attention_scores(k: Float[Array, "b hk s d"], v: Float[Array, "b hk s d"], pos: Int[Array, "b hk s"],
                              mu: Float[Array, "b h d"], cov: Float[Array, "b h d d"] | None, *, n_sink: int,
                              group_reduce: str = "mean", epsilon: float = 0.0,
                              use_vnorm: bool = True) -> Float[Array, "b hk s"]:
    """Steps 3-4 of the module docstring for already-rotated statistics (keys heads-first, as the
    cache stores them; `pos` their positions, -1 = empty). Sinks score +inf, empty slots -inf."""
    valid = (pos >= 0) & (pos >= n_sink)
    b, hk, s, d = k.shape
    g = mu.shape[1] // hk
    k32 = k.astype(jnp.float32)
    mu = mu.reshape(b, hk, g, d)
    logits = jnp.einsum("bhsd,bhgd->bhgs", k32, mu) * d ** -0.5
    if cov is not None:
        cov = cov.reshape(b, hk, g, d, d)
        logits = logits + jnp.einsum("bhsd,bhgde,bhse->bhgs", k32, cov, k32) / (2 * d)
    ok = valid[:, :, None, :]
    probs = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1), 0.0)
    scores = reduce_group(probs, group_reduce, axis=2)  # [B, Hkv, S]
    scores = (scores + epsilon) * key_norms(v) if use_vnorm else scores + epsilon
    return jnp.where(valid, scores, jnp.where((pos >= 0) & (pos < n_sink), jnp.inf, -jnp.inf))


def rotated_statistics(mu, cov, start, n_future: int, inv_freq, use_covariance: bool):
    """Query statistics moved to the future window start..start+n-1 (step 2 of the docstring)."""
    rot = averaged_rope(start, n_future, inv_freq)  # [B, D, D]
    mu = jnp.einsum("bde,bhe->bhd", rot, mu)
    cov = jnp.einsum("bde,bhef,bgf->bhdg", rot, cov, rot) if use_covariance else None
    return mu, cov


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttention(CachePolicy):
    """n_future_positions: future queries the RoPE average spans, default 512. epsilon: added to the
    expected attention before the value-norm weighting, default 0 (the public leaderboard's AdaKV
    configuration uses 1e-2). use_covariance: include the k^T Sigma k / 2d term, default True.
    use_vnorm: multiply by ||v||, default True. n_sink: first positions always kept and left out of
    the query statistics, default 4. decode_evict: evict at decode time by the same scores (module
    docstring); needs num_query_heads, the model's query heads (filled by PiKVModel)."""

    name: ClassVar[str] = "expected_attention"
    n_future_positions: int = 512
    epsilon: float = 0.0
    use_covariance: bool = True
    use_vnorm: bool = True
    num_query_heads: int = 0

    def __post_init__(self):
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be an integer >= 1, got {self.n_future_positions!r}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if not isinstance(self.num_query_heads, int) or self.num_query_heads < 0:
            raise ValueError(f"num_query_heads must be an integer >= 0, got {self.num_query_heads!r}")
        super().__post_init__()

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        if ctx.q_raw is None or ctx.inv_freq is None:
            raise ValueError("expected_attention needs the queries before RoPE and the RoPE frequencies "
                             "(PrefillContext.q_raw and inv_freq); the model's forward pass provides them")
        mu, cov = query_statistics(ctx.q_raw, ctx.pos, self.n_sink)
        mu, cov = rotated_statistics(mu, cov, ctx.lengths, self.n_future_positions, ctx.inv_freq, self.use_covariance)
        hk = ctx.k.shape[2]
        pos = jnp.broadcast_to(ctx.pos[:, None, :], (ctx.pos.shape[0], hk, ctx.pos.shape[1]))
        return expected_attention_scores(jnp.swapaxes(ctx.k, 1, 2), jnp.swapaxes(ctx.v, 1, 2), pos, mu, cov,
                                         n_sink=self.n_sink, group_reduce=self.group_reduce, epsilon=self.epsilon,
                                         use_vnorm=self.use_vnorm)

    # ------------------------------------------------------------------ decode-time eviction

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        cache = super().init_layer_cache(layer, batch, num_kv_heads, capacity, head_dim, dtype)
        if not self.decode_evict:
            return cache
        h = self.num_query_heads
        if h < num_kv_heads or h % num_kv_heads:
            raise ValueError(f"expected_attention with decode_evict needs num_query_heads, a multiple of the "
                             f"{num_kv_heads} KV heads (got {h}); PiKVModel and parse_method(model=...) fill it")
        return cache.replace(extra=dict(q_mean=jnp.zeros((batch, h, head_dim), jnp.float32),
                                        q_cov=jnp.zeros((batch, h, head_dim, head_dim), jnp.float32),
                                        inv_freq=jnp.zeros((batch, head_dim // 2), jnp.float32)))

    def prefill(self, layer: int, cache, ctx: PrefillContext, *, scores=None):
        cache = super().prefill(layer, cache, ctx, scores=scores)
        if not self.decode_evict:
            return cache
        mu, cov = query_statistics(ctx.q_raw, ctx.pos, self.n_sink)
        freq = jnp.broadcast_to(ctx.inv_freq.astype(jnp.float32), (mu.shape[0], ctx.inv_freq.shape[0]))
        return cache.replace(extra=dict(q_mean=mu, q_cov=cov, inv_freq=freq))

    def eviction_scores(self, layer: int, cache, q_pos):
        """Expected attention of every resident key under the prompt's statistics, the future window
        starting after the token being written."""
        ex = cache.extra
        mu, cov = rotated_statistics(ex["q_mean"], ex["q_cov"], q_pos + 1, self.n_future_positions,
                                     ex["inv_freq"][0], self.use_covariance)
        return expected_attention_scores(cache.k, cache.v, cache.pos, mu, cov, n_sink=self.n_sink,
                                         group_reduce=self.group_reduce, epsilon=self.epsilon,
                                         use_vnorm=self.use_vnorm)
