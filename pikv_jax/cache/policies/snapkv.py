"""SnapKV (Li et al., 2024) and PyramidKV (Cai et al., 2024).

SnapKV scores each prompt token by the attention it receives from the last `obs_window` prompt
queries (the observation window; causal inside it), averaged over those queries, reduced over the
GQA group, then smoothed by 1-D pooling (kernel 5) so neighbours of important tokens survive. It
keeps the top budget - obs_window tokens plus the window itself. Prefill only: decoded tokens are
appended (decode_evict False) unless combined with a decode-time policy.

PyramidKV uses the same scores with per-layer budgets that decrease linearly with depth (more in
lower layers, which attend broadly), averaging the target budget: with m = budget - window,
min = m / beta, max = 2m - min, layer l keeps window + max - l (max - min) / (L - 1). The fixed
part ("window" above) is every protected token, n_sink + obs_window (the paper has no sinks), so
even the last layer keeps its sinks, its whole observation window and one selected token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.policies.scoring import avg_pool, max_pool, window_probs


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKV(CachePolicy):
    """obs_window: observation window w (also the protected recent window), default 64.
    kernel: pooling kernel (odd), default 5. pooling: "avg" (default) or "max"."""

    name: ClassVar[str] = "snapkv"
    obs_window: int = 64
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        if self.obs_window < 1:
            raise ValueError(f"obs_window must be >= 1, got {self.obs_window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling={self.pooling!r}; allowed: avg, max")
        if self.decode_evict:
            raise ValueError(f"{self.name} scores tokens only at prefill, so it cannot evict at decode time; "
                             "compose it with a decode-time policy (Composite / --decode-policy h2o)")
        if self.window == 0:
            object.__setattr__(self, "window", self.obs_window)
        super().__post_init__()

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        probs, q_pos = window_probs(ctx, self.obs_window, self.group_reduce)  # [B, Hkv, w, S]
        n_obs = jnp.maximum(jnp.sum(q_pos >= 0, axis=-1), 1).astype(jnp.float32)[:, None, None]
        scores = jnp.sum(probs, axis=2) / n_obs
        pooled = avg_pool(scores, self.kernel) if self.pooling == "avg" else max_pool(scores, self.kernel)
        return jnp.where(ctx.pos[:, None, :] >= 0, pooled, -jnp.inf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidKV(SnapKV):
    """num_layers: depth of the model (budgets are spread over it). beta: max/min budget
    steepness, default 20 (the paper's)."""

    name: ClassVar[str] = "pyramidkv"
    num_layers: int = 0
    beta: float = 20.0

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 for PyramidKV, got {self.num_layers}")
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        super().__post_init__()

    def layer_fraction(self, layer: int) -> float:
        """Layer's share of the non-window budget relative to the average (mean over layers = 1)."""
        if self.num_layers == 1:
            return 1.0
        lo = 1.0 / self.beta
        hi = 2.0 - lo
        return hi - layer * (hi - lo) / (self.num_layers - 1)
