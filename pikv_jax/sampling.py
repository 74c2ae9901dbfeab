"""Token sampling: greedy, or temperature with optional top-k and top-p (nucleus) filtering.

`SamplingConfig` is static (hashable); each row draws from its own key, derived from the seed,
the row index and the step, so a row's samples do not depend on which other rows share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not (t >= 0.0) or t != t or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits, cfg: SamplingConfig):
    """Masks (to -inf) tokens outside top-k and outside the top-p nucleus. logits: f32[B, V]."""
    neg = jnp.finfo(logits.dtype).min
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < cfg.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def row_keys(seed_key, step, batch: int):
    """One key per row for this step: fold_in(fold_in(seed, row), step)."""
    rows = jax.vmap(lambda r: jax.random.fold_in(seed_key, r))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(rows)


def sample(logits, cfg: SamplingConfig, seed_key, step):
    """logits f32[B, V] -> i32[B]."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / cfg.temperature, cfg)
    keys = row_keys(seed_key, step, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
