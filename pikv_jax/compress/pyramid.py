"""PiKV's pyramid compressor: per-layer prompt budgets from `num_levels` / `decay_factor`.

PiKV's `PyramidCompressor(hidden_size, compression_ratio=0.5, num_levels=3, decay_factor=0.8)`
stacks `num_levels` levels whose kept size is compression_ratio, then compression_ratio *
decay_factor, ... of the previous one (a stub autoencoder that keeps tensor shapes). Our faithful
reading as a KV-cache method, in the spirit of PyramidKV (more cache in lower layers):
- the model's layers are split into `num_levels` contiguous levels of (nearly) equal size,
  level(l) = floor(l * num_levels / L);
- level i keeps ratio_i = clip(compression_ratio * decay_factor ** i, min_ratio, 1) of each row's
  prompt (at least its sinks and observation window);
- tokens are chosen by SnapKV scores (observation window `obs_window`, pooling `kernel`).
Each layer's cache is allocated at its own budget (+ new tokens), so memory really shrinks.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, select_top
from pikv_jax.cache.policies.scoring import avg_pool
from pikv_jax.cache.policies.snapkv import SnapKV
from pikv_jax.compress.base import KVCompressor, check_hidden_size
from pikv_jax.compress.selection import (
    SelectedKV,
    SelectorPolicy,
    kept_budget,
    select_standalone,
    standalone_importance,
    top_keep_mask,
)


def check_pyramid(compression_ratio: float, num_levels: int, decay_factor: float, min_ratio: float) -> None:
    if not 0.0 < compression_ratio <= 1.0:
        raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio}")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be an integer >= 1, got {num_levels!r}")
    if not 0.0 < decay_factor <= 1.0:
        raise ValueError(f"decay_factor must be in (0, 1], got {decay_factor}")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")


def level_of(layer: int, num_layers: int, num_levels: int) -> int:
    return min(layer * num_levels // num_layers, num_levels - 1)


def level_ratio(level: int, compression_ratio: float, decay_factor: float, min_ratio: float) -> float:
    return min(1.0, max(min_ratio, compression_ratio * decay_factor ** level))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidPolicy(SelectorPolicy):
    """ratios: kept share of the prompt per layer (tuple, one per layer). obs_window / kernel /
    pooling: SnapKV scoring (the observation window is also the protected recent window)."""

    name: ClassVar[str] = "pyramid"
    ratios: tuple[float, ...] = ()
    obs_window: int = 64
    kernel: int = 5

    def __post_init__(self):
        if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be one value in (0, 1] per layer, got {self.ratios!r}")
        if self.obs_window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"obs_window must be >= 1 and kernel odd >= 1, got {self.obs_window}, {self.kernel}")
        object.__setattr__(self, "window", self.obs_window)
        super().__post_init__()

    @property
    def method_label(self) -> str:
        return f"pyramid:{self.ratios[0]:g}..{self.ratios[-1]:g}"

    def ratio(self, layer: int) -> float:
        if not 0 <= layer < len(self.ratios):
            raise ValueError(f"pyramid budgets cover {len(self.ratios)} layers; layer {layer} is out of range")
        return self.ratios[layer]

    def layer_budget(self, layer, prompt_len):
        return kept_budget(prompt_len, self.protected_count, ratio=self.ratio(layer))

    def row_budget(self, layer, lengths, prompt_len):
        rows = jnp.ceil(lengths.astype(jnp.float32) * self.ratio(layer) - 1e-6).astype(jnp.int32)
        rows = jnp.maximum(rows, self.protected_count)
        return jnp.minimum(jnp.minimum(rows, lengths), self.layer_budget(layer, prompt_len))

    def select(self, layer: int, ctx: PrefillContext):
        s = ctx.prompt_len
        scorer = SnapKV(obs_window=self.obs_window, kernel=self.kernel, group_reduce=self.group_reduce)
        budget = self.layer_budget(layer, s)
        return select_top(scorer.prefill_scores(layer, ctx), ctx.pos, ctx.lengths, budget,
                          self.row_budget(layer, ctx.lengths, s), n_sink=self.n_sink, window=self.window)


class PyramidCompressor(KVCompressor):
    """Pyramid per-layer budgets (see the module docstring).

    compression_ratio: kept share at level 0, in (0, 1]; num_levels >= 1; decay_factor in (0, 1]:
    level i keeps compression_ratio * decay_factor ** i; min_ratio: floor of any level's share.
    num_layers: the model depth (needed by `as_policy`; `PiKVModel`-aware helpers pass it).
    Standalone calls compress one layer's keys/values at `layer` (default 0; with num_layers
    unset, layer index = level index) by `importance` f32[B, S] / [B, Hkv, S] (default: SnapKV
    scores with the last keys standing in for the observation-window queries). hidden_size
    (optional, the seed's first argument): the per-token width K/V must have (heads kept as given).
    """

    name = "pyramid"

    def __init__(self, hidden_size: int | None = None, compression_ratio: float = 0.5, num_levels: int = 3,
                 decay_factor: float = 0.8, *, min_ratio: float = 0.05, num_layers: int | None = None,
                 obs_window: int = 64, kernel: int = 5, n_sink: int = 4):
        super().__init__()
        check_pyramid(compression_ratio, num_levels, decay_factor, min_ratio)
        self.hidden_size = check_hidden_size(hidden_size)
        if num_layers is not None and num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.compression_ratio, self.num_levels, self.decay_factor = float(compression_ratio), num_levels, decay_factor
        self.min_ratio, self.num_layers = min_ratio, num_layers
        self.obs_window, self.kernel, self.n_sink = obs_window, kernel, n_sink

    def level_ratios(self) -> list[float]:
        return [level_ratio(i, self.compression_ratio, self.decay_factor, self.min_ratio)
                for i in range(self.num_levels)]

    def layer_ratios(self, num_layers: int | None = None) -> tuple[float, ...]:
        n = num_layers or self.num_layers
        if n is None:
            raise ValueError("PyramidCompressor needs num_layers (pass num_layers= or build it from a model)")
        return tuple(self.level_ratios()[level_of(l, n, self.num_levels)] for l in range(n))

    def compress(self, keys, values, importance=None, *, layer: int | None = None) -> SelectedKV:
        """The tokens `layer` (default 0; `compressor(keys, values, layer=l)`) keeps of keys/values
        [B, Hkv, S, D], per KV head."""
        layer = 0 if layer is None else layer
        ratios = self.layer_ratios(self.num_layers or self.num_levels)
        if not 0 <= layer < len(ratios):
            raise ValueError(f"layer {layer} is out of range for {len(ratios)} layers")
        imp = standalone_importance(keys, importance, window=self.obs_window)  # [B, Hkv, S]
        if importance is None:  # SnapKV pooling of the proxy attention
            imp = avg_pool(imp, self.kernel)
        kept = kept_budget(keys.shape[2], self.n_sink + self.obs_window, ratio=ratios[layer])
        return select_standalone(keys, values, top_keep_mask(imp, kept, self.n_sink, self.obs_window), kept)

    def as_policy(self, inner=None, *, num_layers: int | None = None) -> PyramidPolicy:
        return PyramidPolicy(inner=inner if inner is not None else CachePolicy(), ratios=self.layer_ratios(num_layers),
                             obs_window=self.obs_window, kernel=self.kernel, n_sink=self.n_sink)
