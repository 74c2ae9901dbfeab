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


def _nucleus_cutoff(sorted_desc, top_p):
    """Smallest logit kept by top-p, from logits sorted in descending order: the shortest prefix
    whose probability mass reaches top_p (always at least the best token). top_p broadcasts."""
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)


def filter_logits(logits, cfg: SamplingConfig):
    """Masks (to -inf) tokens outside top-k and outside the top-p nucleus. logits: f32[B, V]."""
    neg = jnp.finfo(logits.dtype).min
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        cutoff = _nucleus_cutoff(jnp.sort(logits, axis=-1)[..., ::-1], cfg.top_p)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def filter_logits_rows(logits, top_k, top_p):
    """`filter_logits` with per-row settings as arrays (top_k i32[B], 0 = off; top_p f32[B], 1 =
    off), so rows with different settings share one compiled program; for equal settings the kept
    tokens are those of `filter_logits`. logits: f32[B, V]."""
    neg = jnp.finfo(logits.dtype).min
    v = logits.shape[-1]
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, neg, logits)
    sorted_desc = jnp.where(sorted_desc < kth, neg, sorted_desc)  # the sorted top-k-filtered logits
    cutoff = jnp.where((top_p < 1.0)[:, None], _nucleus_cutoff(sorted_desc, top_p[:, None]), -jnp.inf)
    return jnp.where(logits < cutoff, neg, logits)


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


def sample_rows(logits, temperature, top_k, top_p, keys):
    """Per-row sampling settings as arrays: logits f32[B, V], temperature f32[B] (0 = greedy),
    top_k i32[B], top_p f32[B], keys: one key per row for this token -> i32[B]. A row draws what
    `sample` draws for the same settings and key; the sort behind top-k/top-p runs only when some
    row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        t = jnp.where(temperature > 0, temperature, 1.0)
        filtered = filter_logits_rows(logits.astype(jnp.float32) / t[:, None], top_k, top_p)
        return jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, logits)
