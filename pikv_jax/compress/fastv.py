"""FastV (Chen et al., 2024): after layer K, drop the prompt tokens the last prompt token attends to
least.

1. At layer K (default 2), score every prompt token of a row by the attention it receives from the
   row's last prompt token, averaged over all query heads.
2. Rank the row's tokens by that score, with the first `n_sink` tokens and the last `window`
   tokens protected (never dropped).
3. Layers 0..K keep every prompt token; layers above K keep the top
   ceil((1 - drop_ratio) * L_b) tokens of a row of L_b tokens (the same tokens in every layer
   above K and every KV head), so their caches are really smaller: capacity = kept + new tokens.

The ranking travels from layer K to the layers above it through `PrefillContext.shared`.

Semantics: the original FastV also removes the dropped tokens from the prefill computation of
the layers above K (their hidden states stop being computed). We keep the prompt's own attention
exact and only prune what later tokens can attend to (kvpress semantics, as every policy here):
the prompt's logits are unchanged, generated tokens see the pruned caches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, select_top
from pikv_jax.cache.policies.scoring import window_probs
from pikv_jax.compress.base import KVCompressor, check_hidden_size
from pikv_jax.compress.selection import (
    SelectedKV,
    SelectorPolicy,
    select_standalone,
    standalone_importance,
    top_keep_mask,
)

SHARED_KEY = "fastv_scores"


def check_fastv(layer: int, drop_ratio: float) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"FastV layer K must be an integer >= 0, got {layer!r}")
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"FastV drop_ratio must be in [0, 1), got {drop_ratio}")


def kept_tokens(n, drop_ratio: float, protected_count: int):
    """Tokens kept of n (python int or i32 array): n - floor(R n), at least the protected ones."""
    if isinstance(n, int):
        return min(n, max(n - math.floor(drop_ratio * n + 1e-9), protected_count))
    keep = n - jnp.floor(drop_ratio * n.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    return jnp.minimum(n, jnp.maximum(keep, protected_count))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastVPolicy(SelectorPolicy):
    """layer: K (layers <= K keep everything, as `inner` would). drop_ratio: share R of a row's
    prompt dropped above K. n_sink / window: protected first and last tokens (default 4 / 8).
    With an inner budget, layers <= K follow the inner policy and layers above K keep
    min(FastV's count, the inner budget) tokens in FastV's ranking."""

    name: ClassVar[str] = "fastv"
    layer: int = 2
    drop_ratio: float = 0.5
    window: int = 8

    def __post_init__(self):
        check_fastv(self.layer, self.drop_ratio)
        super().__post_init__()

    @property
    def method_label(self) -> str:
        return f"fastv:{self.layer}:{self.drop_ratio:g}"

    def layer_budget(self, layer, prompt_len):
        if layer <= self.layer:
            return self.inner.layer_budget(layer, prompt_len)
        kept = kept_tokens(prompt_len, self.drop_ratio, self.protected_count)
        return min(kept, self.inner.layer_budget(layer, prompt_len)) if self.inner.has_budget else kept

    def row_budget(self, layer, lengths, prompt_len):
        if layer <= self.layer:
            return self.inner.row_budget(layer, lengths, prompt_len)
        rows = kept_tokens(lengths, self.drop_ratio, self.protected_count)
        if self.inner.has_budget:
            rows = jnp.minimum(rows, self.inner.row_budget(layer, lengths, prompt_len))
        return jnp.minimum(rows, self.layer_budget(layer, prompt_len))

    def capacity_for(self, layer, prompt_len, max_new_tokens):
        if layer <= self.layer:
            return self.inner.capacity_for(layer, prompt_len, max_new_tokens)
        return super().capacity_for(layer, prompt_len, max_new_tokens)

    def share_prefill(self, layer: int, ctx: PrefillContext) -> None:
        if layer == self.layer and SHARED_KEY not in ctx.shared:
            probs, _ = window_probs(ctx, 1, "mean")  # [B, Hkv, 1, S], group-averaged
            ctx.shared[SHARED_KEY] = jnp.mean(probs[:, :, 0], axis=1)  # mean over all query heads: [B, S]

    def prefill(self, layer: int, cache, ctx: PrefillContext, *, scores=None):
        if layer <= self.layer:
            self.share_prefill(layer, ctx)
            return self.inner.prefill(layer, cache, ctx, scores=scores)
        if SHARED_KEY not in ctx.shared:
            raise ValueError(f"FastV at layer {layer} needs the ranking of layer {self.layer}: the model has fewer "
                             f"layers than K + 1, or layers were not prefilled in order")
        return super().prefill(layer, cache, ctx)

    def select(self, layer: int, ctx: PrefillContext):
        b, s, hk, _ = ctx.k.shape
        scores = jnp.broadcast_to(ctx.shared[SHARED_KEY][:, None, :], (b, hk, s))
        budget = self.layer_budget(layer, s)
        return select_top(scores, ctx.pos, ctx.lengths, budget, self.row_budget(layer, ctx.lengths, s),
                          n_sink=self.n_sink, window=self.window)


class FastVCompressor(KVCompressor):
    """FastV token dropping (see the module docstring). Standalone: keys/values [B, Hkv, S, D] (or
    [B, S, hidden]) and importance f32[B, S] (the last token's head-averaged attention at layer K)
    or f32[B, Hkv, S]; without importance, the keyword `queries` [B, H, D] (the last query) gives
    it, `compressor(keys, values, queries=q)`, else the last key stands in for the last query.
    hidden_size (optional): the per-token width K/V must have (heads kept as given)."""

    name = "fastv"

    def __init__(self, layer: int = 2, drop_ratio: float = 0.5, *, n_sink: int = 4, window: int = 8,
                 hidden_size: int | None = None):
        super().__init__()
        check_fastv(layer, drop_ratio)
        self.hidden_size = check_hidden_size(hidden_size)
        if n_sink < 0 or window < 0:
            raise ValueError(f"n_sink and window must be >= 0, got {n_sink}, {window}")
        self.layer, self.drop_ratio, self.n_sink, self.window = layer, float(drop_ratio), n_sink, window

    def compress(self, keys, values, importance=None, *, queries=None) -> SelectedKV:
        """One row-wide ranking [B, S] (the same tokens kept in every KV head); `queries` [B, H, D]
        or [B, H, S, D] score the tokens when no importance is given."""
        s = keys.shape[2]
        imp = standalone_importance(keys, importance, queries, 1, per_head=False)  # [B, S]
        kept = kept_tokens(s, self.drop_ratio, self.n_sink + self.window)
        return select_standalone(keys, values, top_keep_mask(imp, kept, self.n_sink, self.window), kept)

    def as_policy(self, inner=None) -> FastVPolicy:
        return FastVPolicy(inner=inner if inner is not None else CachePolicy(), layer=self.layer,
                           drop_ratio=self.drop_ratio, n_sink=self.n_sink, window=self.window)
