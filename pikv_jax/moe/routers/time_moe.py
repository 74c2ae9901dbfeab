"""TimeMoERouter: routing conditioned on timestamps through trend and seasonality features."""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, per_token_features


def time_features(timestamps, periods: Sequence[float], time_scale: float):
    """f32[T, 1 + 2P]: [t / time_scale, sin(2 pi t / P_i), cos(2 pi t / P_i) for each period P_i]."""
    t = timestamps.astype(jnp.float32)
    feats = [t[:, None] / time_scale]
    for p in periods:
        ang = (2.0 * math.pi / p) * t
        feats += [jnp.sin(ang)[:, None], jnp.cos(ang)[:, None]]
    return jnp.concatenate(feats, axis=-1)


class TimeMoERouter(BaseRouter):
    """Routing on the hidden state plus features of each token's timestamp (Time-MoE style series).

    Routing algorithm:
      1. logits[T, E] = x @ W_gate.
      2. With `timestamps` (f32 per token [...] or per sequence [B]):
         phi[T, 1 + 2P] = (t / time_scale, sin(2 pi t / P_i), cos(2 pi t / P_i)) for `periods` P_i
         (defaults: daily and weekly seasonality in hours), and logits += phi @ W_time[1 + 2P, E].
         Without timestamps the term is absent: the router is the base top-k router.
      3. With `seasonality` (a caller's own per-token seasonal signal, f32 [...] as timestamps):
         logits += seasonality[:, None] * w_season[E] (the seed's `time_info["seasonality"]`).
      4. Top-k gating, Switch load balance and z-loss as `BaseRouter`.
    """

    kind: ClassVar[str] = "time"
    accepts: ClassVar[tuple[str, ...]] = ("timestamps", "seasonality")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 periods: Sequence[float] = (24.0, 168.0), time_scale: float = 1000.0,
                 rngs: nnx.Rngs | None = None, **kw):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(hidden_size, num_experts, top_k, rngs=rngs, **kw)
        periods = tuple(float(p) for p in periods)
        if any(not p > 0 for p in periods):
            raise ValueError(f"periods must all be > 0, got {periods}")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.periods, self.time_scale = periods, float(time_scale)
        f = 1 + 2 * len(periods)
        self.time_proj = RouterExtraParam(jax.random.normal(rngs.params(), (f, num_experts), jnp.float32) * f ** -0.5)
        self.season_proj = RouterExtraParam(jax.random.normal(rngs.params(), (num_experts,), jnp.float32))

    def _logits(self, x2, inputs):
        logits = super()._logits(x2, inputs)
        ts, season = inputs.get("timestamps"), inputs.get("seasonality")
        if ts is not None:
            t = per_token_features("timestamps", ts, inputs["_lead"], None)
            logits = logits + time_features(t, self.periods, self.time_scale) @ self.time_proj[...]
        if season is not None:
            z = per_token_features("seasonality", season, inputs["_lead"], None)
            logits = logits + z[:, None] * self.season_proj[...]
        return logits
