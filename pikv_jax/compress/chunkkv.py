"""ChunkKV (Liu et al., 2025): keep whole chunks of the prompt, chosen by chunk score.

1. Token scores: SnapKV-style observation-window attention, the softmax attention each prompt token
   receives from the row's last `obs_window` queries (causal inside the window), averaged over
   them and over each GQA group (no pooling: chunks already keep neighbourhoods together).
2. The prompt is cut into chunks of `chunk_size` tokens (chunk c = positions [c * cs, (c + 1) * cs));
   a chunk's score is the sum of its tokens' scores. By default one selection is shared by every
   KV head of the layer (per_head=False: scores summed over heads), as whole semantic chunks.
3. The first `n_sink` tokens and the observation window are always kept. The remaining budget of
   a row (its budget minus those) is filled with chunks in decreasing score order, each costing its
   not-yet-kept tokens, stopping at the first chunk that does not fit: whole chunks only.
Ragged rows: chunks starting at or after a row's length are never chosen; the chunk that holds the
row's last tokens is partial and costs only its real tokens; budgets are per row.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, protected_mask
from pikv_jax.cache.policies.scoring import window_probs
from pikv_jax.compress.base import KVCompressor, check_hidden_size
from pikv_jax.compress.selection import (
    SelectedKV,
    SelectorPolicy,
    kept_budget,
    mask_to_indices,
    select_standalone,
    standalone_importance,
)
from pikv_jax.intmath import cdiv


def check_chunkkv(chunk_size: int, obs_window: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if obs_window < 1:
        raise ValueError(f"obs_window must be >= 1, got {obs_window}")


def chunk_keep_mask(scores, valid, protect, row_budget, chunk_size: int):
    """Whole-chunk selection.

    scores: f32[B, H, S] token scores; valid, protect: bool[B, H, S] (protect implies kept);
    row_budget: i32[B] tokens a row may keep. Returns keep bool[B, H, S].
    """
    b, h, s = scores.shape
    n_chunks = cdiv(s, chunk_size)
    pad = n_chunks * chunk_size - s
    grp = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=fill).reshape(b, h, n_chunks,
                                                                                               chunk_size)
    sel = valid & ~protect  # tokens a chunk would add
    chunk_score = jnp.sum(jnp.where(grp(valid, False), grp(scores, 0.0), 0.0), axis=-1)  # [B, H, n]
    cost = jnp.sum(grp(sel, False), axis=-1)  # [B, H, n]
    candidate = cost > 0
    remaining = row_budget[:, None] - jnp.sum(protect & valid, axis=-1)  # [B, H]
    ranked = jnp.where(candidate, chunk_score, -jnp.inf)
    order = jnp.argsort(-ranked, axis=-1, stable=True)  # best first; ties: earlier chunk
    cum = jnp.cumsum(jnp.take_along_axis(cost, order, axis=-1), axis=-1)
    take_sorted = (cum <= remaining[..., None]) & jnp.take_along_axis(candidate, order, axis=-1)
    chosen = jnp.zeros((b, h, n_chunks), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], order].set(take_sorted)
    chosen_tok = jnp.repeat(chosen, chunk_size, axis=-1)[..., :s]
    return valid & (protect | chosen_tok)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkKVPolicy(SelectorPolicy):
    """chunk_size (default 20), obs_window (default 64, also the protected recent window),
    per_head (default False). Budget: budget_ratio / budget_tokens (per row, as every policy)."""

    name: ClassVar[str] = "chunkkv"
    chunk_size: int = 20
    obs_window: int = 64
    per_head: bool = False

    def __post_init__(self):
        check_chunkkv(self.chunk_size, self.obs_window)
        if self.budget_ratio is None and self.budget_tokens is None:
            raise ValueError("chunkkv needs a budget (budget_ratio or budget_tokens)")
        object.__setattr__(self, "window", self.obs_window)
        super().__post_init__()

    @property
    def method_label(self) -> str:
        b = f"{self.budget_tokens}t" if self.budget_tokens is not None else f"{self.budget_ratio:g}"
        return f"chunkkv:{b}:{self.chunk_size}"

    def layer_budget(self, layer, prompt_len):
        """Static slots: the budget, but never fewer than the protected sinks + observation window."""
        return kept_budget(prompt_len, self.protected_count, ratio=self.budget_ratio, tokens=self.budget_tokens)

    def row_budget(self, layer, lengths, prompt_len):
        base = jnp.maximum(self.base_row_budget(lengths), jnp.minimum(lengths, self.protected_count))
        return jnp.minimum(jnp.minimum(base, lengths), self.layer_budget(layer, prompt_len))

    def token_scores(self, ctx: PrefillContext):
        """f32[B, Hkv, S]: mean attention from the observation window (GQA groups reduced)."""
        probs, q_pos = window_probs(ctx, self.obs_window, self.group_reduce)
        n_obs = jnp.maximum(jnp.sum(q_pos >= 0, axis=-1), 1).astype(jnp.float32)[:, None, None]
        return jnp.sum(probs, axis=2) / n_obs

    def select(self, layer: int, ctx: PrefillContext):
        b, s, hk, _ = ctx.k.shape
        scores = self.token_scores(ctx)
        pos = jnp.broadcast_to(ctx.pos[:, None, :], (b, hk, s))
        protect = protected_mask(pos, ctx.lengths - 1, self.n_sink, self.window)
        if not self.per_head:
            scores, pos, protect = jnp.sum(scores, axis=1, keepdims=True), pos[:, :1], protect[:, :1]
        keep = chunk_keep_mask(scores, pos >= 0, protect, self.row_budget(layer, ctx.lengths, s), self.chunk_size)
        keep = jnp.broadcast_to(keep, (b, hk, s))
        return mask_to_indices(keep, self.layer_budget(layer, s))


class ChunkKVCompressor(KVCompressor):
    """ChunkKV chunk selection (see the module docstring).

    chunk_size: tokens per chunk (default 20). compression_ratio: kept share of each row's prompt,
    or budget_tokens; when neither is given `as_policy(inner)` uses the inner policy's budget, and
    0.5 if it has none. obs_window, n_sink, per_head: as in ChunkKVPolicy. Standalone: importance
    f32[B, S] or [B, Hkv, S] per token (default: observation-window attention of the keyword
    `queries` [B, H, w, D] when given, `compressor(keys, values, queries=q)`, else with the last
    keys standing in for the queries). hidden_size (optional): the per-token width K/V must have
    (heads kept as given).
    """

    name = "chunkkv"

    def __init__(self, chunk_size: int = 20, compression_ratio: float | None = None, *,
                 budget_tokens: int | None = None, obs_window: int = 64, n_sink: int = 4, per_head: bool = False,
                 hidden_size: int | None = None):
        super().__init__()
        check_chunkkv(chunk_size, obs_window)
        self.hidden_size = check_hidden_size(hidden_size)
        if compression_ratio is not None and budget_tokens is not None:
            raise ValueError("give either compression_ratio or budget_tokens, not both")
        if compression_ratio is not None and not 0.0 < compression_ratio <= 1.0:
            raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio}")
        if budget_tokens is not None and budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
        self.chunk_size, self.compression_ratio, self.budget_tokens = chunk_size, compression_ratio, budget_tokens
        self.obs_window, self.n_sink, self.per_head = obs_window, n_sink, per_head

    def compress(self, keys, values, importance=None, *, queries=None) -> SelectedKV:
        """Whole chunks of keys/values [B, Hkv, S, D]; `queries` [B, H, w, D] (the last w) score the
        tokens when no importance is given."""
        b, hk, s, _ = keys.shape
        imp = standalone_importance(keys, importance, queries, self.obs_window)  # [B, Hkv, S]
        ratio = self.compression_ratio if self.compression_ratio is not None else 0.5
        budget = kept_budget(s, self.n_sink + self.obs_window, ratio=ratio, tokens=self.budget_tokens)
        pos = jnp.broadcast_to(jnp.arange(s), (b, hk, s))
        protect = protected_mask(pos, jnp.full((b,), s - 1), self.n_sink, self.obs_window)
        if not self.per_head:
            imp, pos, protect = jnp.sum(imp, axis=1, keepdims=True), pos[:, :1], protect[:, :1]
        keep = chunk_keep_mask(imp, pos >= 0, protect, jnp.full((b,), budget, jnp.int32), self.chunk_size)
        return select_standalone(keys, values, keep, budget)

    def as_policy(self, inner=None) -> ChunkKVPolicy:
        inner = inner if inner is not None else CachePolicy()
        budget = {}
        if self.compression_ratio is not None:
            budget["budget_ratio"] = self.compression_ratio
        elif self.budget_tokens is not None:
            budget["budget_tokens"] = self.budget_tokens
        elif inner.budget_ratio is not None or inner.budget_tokens is not None:
            budget = {"budget_ratio": inner.budget_ratio} if inner.budget_ratio is not None else {
                "budget_tokens": inner.budget_tokens}
        else:
            budget["budget_ratio"] = 0.5
        return ChunkKVPolicy(inner=inner, chunk_size=self.chunk_size, obs_window=self.obs_window, n_sink=self.n_sink,
                             per_head=self.per_head, **budget)
