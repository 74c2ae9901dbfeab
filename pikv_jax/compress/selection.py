"""What FastV, ChunkKV and the pyramid compressor share: a prompt selector that wraps an eviction
policy, and the standalone result of a token-selecting compressor.

`SelectorPolicy`: the compressor chooses which prompt tokens each layer keeps (and so each layer's
real capacity); `inner` (default Full) gives kept tokens their initial scores and owns every
decode-time hook (slot choice, eviction, score updates), so `--policy h2o --compress chunkkv`
selects chunks at prefill and evicts with H2O while decoding. Sinks (`n_sink`) and the recent
`window` are protected at prefill.

Standalone calls: `standalone_importance` (the given importance, or the attention of the last
queries / keys), `kept_budget` (tokens kept of a ratio or count), `top_keep_mask` (the best tokens,
sinks and recent window protected) and `select_standalone`, which gathers the kept tokens into a
`SelectedKV`: [B, Hkv, K, D] with their positions; it decompresses to the original [B, Hkv, S, D]
with zeros at dropped positions (so the reconstruction error is the energy of what was dropped).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from pikv_jax.attention import reference
from pikv_jax.cache import ops
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, protected_mask
from pikv_jax.cache.state import LayerCache, static_field
from pikv_jax.compress.base import CACHE_LAYOUT, CompressedKV, Layout
from pikv_jax.compress.wrapper import DecodeByInner, check_inner, decode_owner


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectorPolicy(DecodeByInner):
    """Base of prompt-selecting compressor policies (see the module docstring). Subclasses define
    `select(layer, ctx) -> (idx i32[B, Hkv, K], ok bool[B, Hkv, K])`, `layer_budget` and
    `row_budget`."""

    name: ClassVar[str] = "selector"

    def __post_init__(self):
        check_inner(self.inner, self.name)
        object.__setattr__(self, "group_reduce", self.inner.group_reduce)
        super().__post_init__()

    @property
    def method_label(self) -> str:
        return self.name

    @property
    def label(self) -> str:
        return self.method_label if self.inner.name == "full" else f"{self.inner.label}+{self.method_label}"

    @property
    def has_budget(self) -> bool:
        return True

    @property
    def protected_count(self) -> int:
        """Prompt tokens never dropped: the sinks and the recent window."""
        return self.n_sink + self.window

    def keeps_whole_prompt(self, prompt_len: int) -> bool:
        return False

    def capacity_for(self, layer, prompt_len, max_new_tokens):
        kept = self.layer_budget(layer, prompt_len)
        dec = decode_owner(self.inner)
        if self.inner.evicts:
            return kept + dec.evict_every - 1
        return kept + max_new_tokens

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        return self.inner.init_layer_cache(layer, batch, num_kv_heads, capacity, head_dim, dtype)

    def share_prefill(self, layer: int, ctx: PrefillContext) -> None:
        """Hook for information later layers need (FastV's ranking); called before `prefill`."""

    def select(self, layer: int, ctx: PrefillContext):
        raise NotImplementedError

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        self.share_prefill(layer, ctx)
        idx, ok = self.select(layer, ctx)
        init = decode_owner(self.inner).initial_scores(layer, ctx)
        return ops.gather_prompt(cache, ctx.k, ctx.v, ctx.pos, idx, ok, score=init)

    # decode-time hooks belong to the inner policy (DecodeByInner), the layout too
    def write(self, layer, cache, k, v, q_pos, slot, active):
        return self.inner.write(layer, cache, k, v, q_pos, slot, active)

    def attend(self, layer, cache, q, q_pos, *, sliding_window=None, inv_freq=None):
        return self.inner.attend(layer, cache, q, q_pos, sliding_window=sliding_window, inv_freq=inv_freq)


def share_all(policy: CachePolicy, layer: int, ctx: PrefillContext, seen: set) -> None:
    """Calls `share_prefill` of every selector reachable through `.inner` / `.policies` once."""
    stack = [policy]
    while stack:
        p = stack.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        if isinstance(p, SelectorPolicy):
            p.share_prefill(layer, ctx)
        for attr in ("inner", "prefill_policy", "decode_policy"):
            if isinstance(getattr(p, attr, None), CachePolicy):
                stack.append(getattr(p, attr))
        stack.extend(getattr(p, "policies", ()))


def mask_to_indices(keep, budget: int):
    """keep bool[B, H, S] -> (idx i32[B, H, budget], ok bool[B, H, budget]): the kept indices
    (ascending), `ok` False past a row's count. Requires count <= budget."""
    s = keep.shape[-1]
    rank = jnp.where(keep, s - jnp.arange(s), -1)  # earlier kept tokens rank higher
    top, idx = jax.lax.top_k(rank, budget)
    return idx.astype(jnp.int32), top > 0


# ---------------------------------------------------------------------------------------------- standalone


@struct.dataclass
class SelectedKV(CompressedKV):
    """k, v: [B, Hkv, K, D] kept tokens; pos: i32[B, Hkv, K] their positions (-1 = unused slot);
    length: tokens of the original sequence; layout: the caller's (unpacking yields every position,
    dropped tokens zero)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: int = static_field(default=0)
    layout: Layout = static_field(default=CACHE_LAYOUT)

    def decompress(self):
        b, hk, _, d = self.k.shape
        idx = jnp.where(self.pos >= 0, self.pos, self.length)
        bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None]
        out = lambda x: jnp.zeros((b, hk, self.length, d), jnp.float32).at[bi, hi, idx].set(
            x.astype(jnp.float32), mode="drop")
        return out(self.k), out(self.v)

    def attend(self, q):
        out, _ = reference.decode_attention(q.astype(jnp.float32), self.k.astype(jnp.float32),
                                            self.v.astype(jnp.float32), self.pos,
                                            jnp.full((q.shape[0],), self.length - 1, jnp.int32))
        return out


def proxy_importance(keys, queries=None, window: int = 1):
    """f32[B, Hkv, S]: attention of the last `window` queries (mean over them, causal, GQA groups
    averaged) over the keys. Without queries the last `window` keys stand in for them (standalone
    calls only; generation always uses the real queries)."""
    b, hk, s, d = keys.shape
    w = min(window, s)
    if queries is None:
        q = keys[:, :, s - w:, None, :]  # [B, Hkv, w, 1, D]
    else:
        queries = jnp.asarray(queries)  # [B, H, S, D] or [B, H, D] (the last query)
        queries = queries[:, :, None] if queries.ndim == 3 else queries[:, :, s - w:]
        h = queries.shape[1]
        w = queries.shape[2]
        q = jnp.moveaxis(queries.reshape(b, hk, h // hk, w, d), 2, 3)  # [B, Hkv, w, G, D]
    logits = jnp.einsum("bhwgd,bhsd->bhwgs", q.astype(jnp.float32), keys.astype(jnp.float32)) * d ** -0.5
    q_pos = s - w + jnp.arange(w)
    causal = jnp.arange(s)[None, :] <= q_pos[:, None]  # [w, S]
    probs = jax.nn.softmax(jnp.where(causal[None, None, :, None], logits, -jnp.inf), axis=-1)
    return jnp.mean(probs, axis=(2, 3))


def standalone_importance(keys, importance=None, queries=None, window: int = 1, *, per_head: bool = True):
    """Token importance of a standalone call over keys [B, Hkv, S, D]: `importance` as given
    (f32[B, S] or [B, Hkv, S]), else `proxy_importance(keys, queries, window)`. Returns
    f32[B, Hkv, S] (per_head; a [B, S] importance is the same for every head) or f32[B, S]
    (averaged over heads)."""
    b, hk, s, _ = keys.shape
    imp = proxy_importance(keys, queries, window) if importance is None else jnp.asarray(importance, jnp.float32)
    if per_head:
        imp = jnp.broadcast_to(imp[:, None], (b, hk, s)) if imp.shape == (b, s) else imp
    elif imp.ndim == 3:
        imp = jnp.mean(imp, axis=1)
    if imp.shape != ((b, hk, s) if per_head else (b, s)):
        raise ValueError(f"importance must be [B, S] = {(b, s)} or [B, Hkv, S] = {(b, hk, s)}, "
                         f"got {tuple(jnp.shape(importance))}")
    return imp


def kept_budget(n: int, protected_count: int, *, ratio: float | None = None, tokens: int | None = None) -> int:
    """Tokens kept of n: `tokens`, else ceil(ratio * n); at least the protected ones, at most n."""
    k = tokens if tokens is not None else math.ceil(ratio * n - 1e-6)
    return min(n, max(k, protected_count))


def top_keep_mask(importance, kept: int, n_sink: int, window: int):
    """importance f32[..., S] -> keep bool[..., S]: the `kept` most important tokens of each row,
    the first n_sink and the last `window` tokens ranked first (ties: the earlier token)."""
    s = importance.shape[-1]
    ranked = jnp.where(protected(s, n_sink, window), jnp.inf, importance)
    order = jnp.argsort(-ranked, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1) < kept  # a token's place in `order` below kept


def select_standalone(keys, values, keep, width: int | None = None):
    """keys, values [B, Hkv, S, D], keep bool[B, Hkv, S] (or [B, S], [B, 1, S]: the same for every
    head) -> SelectedKV holding the kept tokens in `width` slots (static, at least the largest
    kept count; default: that count, eager only)."""
    keep = jnp.broadcast_to(keep[:, None] if keep.ndim == 2 else keep, keys.shape[:3])
    if width is None:
        width = max(1, int(jnp.max(jnp.sum(keep, axis=-1))))
    idx, ok = mask_to_indices(keep, width)
    take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)
    return SelectedKV(k=take(keys), v=take(values), pos=jnp.where(ok, idx, -1), length=keys.shape[2])


def protected(s: int, n_sink: int, window: int):
    """bool[S]: sinks and the recent window of a full sequence of s tokens."""
    pos = jnp.arange(s)[None]
    return protected_mask(pos, jnp.array([s - 1]), n_sink, window)[0]
